"""Export to GGUF (llama.cpp's format), holding exactly llmpress's weights, for every architecture
llmpress.gguf_arch knows (llama / SmolLM, mistral, qwen2, qwen3, gemma2, gemma3).

Per tensor, the type follows from the compressed layer, with no re-quantization:
- a symmetric 4-bit layer with groups of 32 IS GGUF Q4_0 (w = (q - 8) * d, d fp16 per 32 weights):
  its codes and fp16 scales are written as Q4_0 blocks as they are;
- a symmetric 5-bit layer with groups of 32 IS Q5_0 (w = (q - 16) * d);
- a symmetric 8-bit layer with groups of 32 IS Q8_0 (w = qs * d with qs = q - 128);
- a layer solved on a GGUF grid (`gguf=q4_1|q5_1|q2_k|q3_k|q4_k|q5_k|q6_k`) holds that type's bytes: copied;
- every other linear (other grids, sparse, low-rank, dense) is written merged, in F32 (exact);
- norms in F32; embeddings / LM head copied byte for byte from the source GGUF when the model came
  from one (llmpress never changes them), F32 otherwise.
q_proj / k_proj rows are permuted as llama.cpp's converter does for the llama architecture
(readers undo it); biases (qwen2's q/k/v) are F32; Gemma's norms are stored as 1 + w.
Hyper-parameters come from the model config (llmpress.gguf_arch.write_hparams); the tokenizer (and chat template) from the source
GGUF, or converted from a Hugging Face byte-level BPE tokenizer (tokenizer_metadata, as llama.cpp's
converter does); other tokenizers (SentencePiece) are not converted: the file then has no tokenizer
metadata, which transformers does not need but llama.cpp does (the CLI says so).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmpress.errors import LLMPressError
from llmpress.gguf_arch import check_exportable, extra_tensors, gguf_arch, write_hparams
from llmpress.modules import CompressedLinear, GGMLLinear, QuantLinear, QuantLowRankLinear

Q4_0_BLOCK = 32


def encode_q4_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """codes (out, in) in 0..15 and scale (out, in / 32) fp16 -> Q4_0 bytes (out, in / 32 * 18):
    per block the fp16 d, then 16 bytes whose low nibbles hold weights 0..15 and high nibbles 16..31."""
    out_f, in_f = codes.shape
    q = codes.to(torch.uint8).view(out_f, in_f // 32, 32)
    qs = q[..., :16] | (q[..., 16:] << 4)                                       # (out, B, 16)
    d = scale.to(torch.float16).contiguous().view(torch.uint8).view(out_f, in_f // 32, 2)
    return torch.cat([d, qs], -1).reshape(out_f, -1).numpy()


def encode_q5_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """codes (out, in) in 0..31 and scale (out, in / 32) fp16 -> Q5_0 bytes (out, in / 32 * 22):
    per block the fp16 d, 4 bytes (a little-endian uint32) of fifth bits (bit j: weight j), then 16
    bytes of low nibbles as in Q4_0; w = (q - 16) * d."""
    out_f, in_f = codes.shape
    q = codes.to(torch.int64).view(out_f, in_f // 32, 32)
    low = (q & 0x0F).to(torch.uint8)
    qs = low[..., :16] | (low[..., 16:] << 4)                                   # (out, B, 16)
    high = (q >> 4) & 1                                                         # (out, B, 32)
    qh = (high << torch.arange(32)).sum(-1)                                     # (out, B) < 2**32
    qh = torch.stack([(qh >> (8 * k)) & 0xFF for k in range(4)], -1).to(torch.uint8)
    d = scale.to(torch.float16).contiguous().view(torch.uint8).view(out_f, in_f // 32, 2)
    return torch.cat([d, qh, qs], -1).reshape(out_f, -1).numpy()


def encode_q8_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """codes (out, in) in 0..255 (zero 128) and scale (out, in / 32) -> Q8_0 bytes (out, in / 32 * 34)."""
    out_f, in_f = codes.shape
    qs = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8).view(out_f, in_f // 32, 32)
    d = scale.to(torch.float16).contiguous().view(torch.uint8).view(out_f, in_f // 32, 2)
    return torch.cat([d, qs], -1).reshape(out_f, -1).numpy()


# llama.cpp names the pre-tokenizer (the regex split before BPE) by a fingerprint: the sha256 of the
# token ids a tokenizer gives this text (convert_hf_to_gguf.py, get_vocab_base_pre; llama.cpp PR
# #6920). A few of its entries, for the tokenizers of the models llmpress exports (llama family).
PRE_CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
                  '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
                  '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
                  '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # HuggingFaceTB/SmolLM
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Meta-Llama-3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",       # Qwen1.5 / Qwen2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",       # openai-community/gpt2
}


def tokenizer_metadata(tokenizer, vocab_size: int) -> tuple[dict, list[str]]:
    """A Hugging Face byte-level BPE tokenizer (GPT-2 style: SmolLM, Llama 3, Qwen2) -> the GGUF
    `tokenizer.ggml.*` fields llama.cpp reads, as {key: value}, and notes for the user. Token types
    follow llama.cpp's converter: ids the vocabulary lacks are UNUSED `[PADi]`, special added tokens
    (or ones that look like `<|...|>`) CONTROL, other added tokens USER_DEFINED, the rest NORMAL.
    Raises LLMPressError for other tokenizer models (SentencePiece / Unigram are not converted)."""
    import hashlib
    import json
    import gguf
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    kind = state.get("model", {}).get("type")
    pre = state.get("pre_tokenizer") or {}
    pre_kinds = {p.get("type") for p in pre.get("pretokenizers", [pre])}
    if kind != "BPE" or "ByteLevel" not in pre_kinds:
        raise LLMPressError(f"converting this tokenizer to GGUF is not built (model {kind}, pre-tokenizer "
                            f"{sorted(filter(None, pre_kinds))}); only byte-level BPE (GPT-2 / Llama 3 / Qwen2 / SmolLM) is")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise LLMPressError(f"the tokenizer has ids up to {max(vocab.values())}, the model's vocabulary is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if (i in decoder and decoder[i].special) or looks_special
                         else gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            types.append(gguf.TokenType.NORMAL)
            tokens.append(token)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    fields = {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges}
    notes = []
    fingerprint = hashlib.sha256(str(tokenizer.encode(PRE_CHECK_TEXT)).encode()).hexdigest()
    if fingerprint in PRE_TOKENIZERS:
        fields["pre"] = PRE_TOKENIZERS[fingerprint]
    else:
        notes.append(f"pre-tokenizer not recognized (fingerprint {fingerprint[:12]}...): llama.cpp will use its "
                     "default split, which may tokenize some text differently")
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            fields[f"{name}_id"] = int(token_id)
    if getattr(tokenizer, "add_bos_token", None) is not None:
        fields["add_bos"] = bool(tokenizer.add_bos_token)
    if getattr(tokenizer, "chat_template", None):
        fields["chat_template"] = tokenizer.chat_template
    return fields, notes


def _write_tokenizer(writer, fields: dict) -> None:
    writer.add_tokenizer_model(fields["model"])
    if "pre" in fields:
        writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for name in ("bos", "eos", "unk", "pad"):
        if f"{name}_id" in fields:
            getattr(writer, f"add_{name}_token_id")(fields[f"{name}_id"])
    if "add_bos" in fields:
        writer.add_add_bos_token(fields["add_bos"])
    if "chat_template" in fields:
        writer.add_chat_template(fields["chat_template"])


def _qk_permutation(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, the two rotary halves interleaved."""
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def qk_permutation(config, fqn: str, rows: int) -> torch.Tensor | None:
    """The row order the GGUF file stores linear `fqn` in: llama.cpp's for q_proj / k_proj of the
    llama architecture (gguf_arch.permute_qk), None (as it is) for every other layer."""
    heads = {"self_attn.q_proj": config.num_attention_heads,
             "self_attn.k_proj": config.num_key_value_heads}.get(fqn.split(".", 3)[-1])
    return _qk_permutation(rows, heads) if heads and gguf_arch(config).permute_qk else None


ENCODERS = {"Q4_0": encode_q4_0, "Q5_0": encode_q5_0, "Q8_0": encode_q8_0}
EMBEDDING_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "F16", "F32")   # what gguf-py quantizes
BITS_TYPE = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}        # symmetric b-bit grids with groups of 32


def gguf_type_of(module: nn.Module) -> str:
    if isinstance(module, GGMLLinear):              # solved on a GGUF grid: its bytes, as they are
        return module.type.name
    if isinstance(module, QuantLinear) and module.symmetric and module.group_size == Q4_0_BLOCK \
            and module.in_features % Q4_0_BLOCK == 0 and module.bits in BITS_TYPE:
        return BITS_TYPE[module.bits]
    return "F32"


def _same_tensor(src, p: torch.Tensor) -> bool:
    """Whether the source GGUF tensor dequantizes to exactly the model's parameter (a rotation, for
    one, changes the embeddings: their source bytes must not be copied then)."""
    import gguf
    data = gguf.quants.dequantize(np.asarray(src.data), src.tensor_type)
    return data.size == p.numel() and torch.equal(torch.from_numpy(data).reshape(p.shape).float(), p.detach().float())


def export_gguf(model: nn.Module, out: str | Path, source_gguf: str | Path | None = None,
                float_type: str = "F32", copy_embeddings: bool = True, encode=None,
                adapter_out: str | Path | None = None, tokenizer_fields: dict | None = None,
                embedding_type: str | None = None) -> dict:
    """Write `model` (llama, mistral, qwen2, qwen3, gemma2, gemma3: llmpress.gguf_arch) to the GGUF
    file `out`; returns {tensor name: type}.

    adapter_out: layers with a low-rank correction (gptq-lr) are written as their quantized base,
    and the corrections as a GGUF LoRA adapter file there (llama.cpp's `--lora`; alpha 0, so its
    scale is exactly the user's adapter scale, 1); without it, they are written merged.
    float_type: F32 (exact) or F16 for the linears that are not stored on a GGUF grid;
    copy_embeddings: the source GGUF's embedding bytes (else written in float_type);
    encode(fqn, weight (out, in) float32, already permuted) -> (bytes array, GGMLQuantizationType)
    or None: an override for block linears (benchmarks use it to write reference quantizations);
    tokenizer_fields: the tokenizer to write (tokenizer_metadata's fields of a Hugging Face
    tokenizer) when there is no source GGUF to copy it from;
    embedding_type: write the token embedding (and an untied output layer) re-quantized to this
    GGUF type by gguf-py's round to nearest (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, F16, F32) instead of
    copying / float: smaller and faster in llama.cpp, but no longer llmpress's exact weights there."""
    import gguf
    from llmpress.arch import adapter_for
    from llmpress.formats import densify
    densify(model, only_online=True)          # online rotations: no GGUF op, the layer goes float

    config = model.config
    arch = gguf_arch(config)
    check_exportable(config)                 # refuses what llama.cpp would compute differently
    out = Path(out)
    if out.exists():
        raise LLMPressError(f"{out} already exists")
    if float_type not in ("F32", "F16"):
        raise LLMPressError(f"float_type must be F32 or F16, got {float_type!r}")
    if embedding_type is not None and embedding_type not in EMBEDDING_TYPES:
        raise LLMPressError(f"embedding_type must be one of {', '.join(EMBEDDING_TYPES)}, got {embedding_type!r}")
    adapter = adapter_for(model)
    n_blocks = len(adapter.blocks(model))
    experts = expert_stacks(model, adapter, float_type)         # refuses mixed types before anything is written
    reader = gguf.GGUFReader(str(source_gguf)) if source_gguf else None
    source_tensors = {t.name: t for t in reader.tensors} if reader else {}
    lora: dict[str, np.ndarray] = {}
    if adapter_out is not None:
        adapter_out = Path(adapter_out)
        if adapter_out.exists():
            raise LLMPressError(f"{adapter_out} already exists")
        if not any(isinstance(m, QuantLowRankLinear) for m in model.modules()):
            raise LLMPressError("the model has no quantized layers with a low-rank correction (gptq-lr)")
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch.name)
    writer.add_name(getattr(config, "_name_or_path", "") or "llmpress export")
    write_hparams(writer, config, n_blocks)
    if reader is not None:                                  # tokenizer and chat template, as they were
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                sub = field.types[1] if len(field.types) > 1 else None
                writer.add_key_value(key, field.contents(), field.types[0], sub)
    elif tokenizer_fields is not None:
        _write_tokenizer(writer, tokenizer_fields)
    names = gguf.get_tensor_name_map(arch.model_arch(), n_blocks)
    types: dict[str, str] = {}
    for name, data in extra_tensors(config).items():        # llama3 rotary factors
        writer.add_tensor(name, data)
        types[name] = "F32"
    tied = bool(getattr(config, "tie_word_embeddings", False))
    linears = set(adapter.linear_names(model))
    with torch.no_grad():
        for fqn, module in model.named_modules():
            params = dict(module.named_parameters(recurse=False))
            if fqn in experts:
                for target, (data, kind) in experts[fqn].items():
                    writer.add_tensor(target, data, raw_dtype=None if kind in ("F32", "F16") else
                                      getattr(gguf.GGMLQuantizationType, kind))
                    types[target] = kind
                continue
            if adapter.moe is not None and ".experts." in fqn:
                continue                                       # written stacked, with their layer above
            if fqn in linears:
                target = names.get_name(fqn + ".weight", try_suffixes=(".weight",))
                perm = qk_permutation(config, fqn, module.out_features)
                bias = getattr(module, "bias", None)
                if adapter_out is not None and isinstance(module, QuantLowRankLinear):
                    # the adapter's B rows follow the base's row order (q/k permuted likewise)
                    up = module.up if perm is None else module.up[perm]
                    lora[target + ".lora_a"] = module.down.contiguous().numpy()          # (r, in) fp16
                    lora[target + ".lora_b"] = up.contiguous().numpy()                   # (out, r) fp16
                    module = module.quant
                kind = gguf_type_of(module)
                if kind == "F32" or encode is not None:
                    w = module.dense_weight() if isinstance(module, CompressedLinear) else module.weight.float()
                    w = (w if perm is None else w[perm]).contiguous().numpy()
                    custom = encode(fqn, w) if encode is not None else None
                    if custom is not None:
                        writer.add_tensor(target, custom[0], raw_dtype=custom[1])
                        kind = custom[1].name
                    else:
                        kind = float_type
                        writer.add_tensor(target, w.astype(np.float16 if float_type == "F16" else np.float32))
                elif isinstance(module, GGMLLinear):
                    raw = module.raw if perm is None else module.raw[perm]     # whole blocks per row
                    writer.add_tensor(target, raw.contiguous().numpy(), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
                else:
                    codes, scale = module.int_weight(), module.scale
                    if perm is not None:
                        codes, scale = codes[perm], scale[perm]
                    data = ENCODERS[kind](codes, scale)
                    writer.add_tensor(target, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
                types[target] = kind
                if bias is not None:                           # qwen2's q/k/v: F32, rows as the weight's
                    b = bias.detach().float() if perm is None else bias.detach().float()[perm]
                    writer.add_tensor(target[: -len(".weight")] + ".bias", b.contiguous().numpy())
                    types[target[: -len(".weight")] + ".bias"] = "F32"
                continue
            for pname, p in params.items():
                full = f"{fqn}.{pname}" if fqn else pname
                if fqn == "lm_head" and (tied or arch.tied_only):
                    continue
                target = names.get_name(full, try_suffixes=(".weight",))
                if target is None:
                    raise LLMPressError(f"no GGUF name for {full}")
                src = source_tensors.get(target)
                embedding = fqn in ("model.embed_tokens", "lm_head")
                if embedding and embedding_type is not None:
                    data = p.detach().float().contiguous().numpy()
                    if embedding_type in ("F16", "F32"):
                        writer.add_tensor(target, data.astype(np.float16 if embedding_type == "F16" else np.float32))
                    else:
                        kind = getattr(gguf.GGMLQuantizationType, embedding_type)
                        writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)
                    types[target] = embedding_type
                elif copy_embeddings and embedding and src is not None and _same_tensor(src, p):
                    # unchanged by llmpress (not rotated): the source's bytes, exactly what the model was loaded from
                    writer.add_tensor(target, np.asarray(src.data), raw_dtype=src.tensor_type)
                    types[target] = src.tensor_type.name
                else:                                           # norms stay F32, as llama.cpp keeps them
                    kind = float_type if embedding else "F32"
                    data = p.detach().float()
                    if arch.norm_shift and full.endswith("norm.weight"):
                        data = data + arch.norm_shift                 # Gemma: x * (1 + w) is stored as w + 1
                    writer.add_tensor(target, data.contiguous().numpy().astype(
                        np.float16 if kind == "F16" else np.float32))
                    types[target] = kind
    try:
        _finish(writer, tmp, None)
        if lora:
            _write_lora(lora, adapter_out)
        shutil.move(str(tmp), str(out))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return types


_EXPS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def expert_stacks(model: nn.Module, adapter, float_type: str = "F32") -> dict[str, dict[str, tuple[np.ndarray, str]]]:
    """{experts module fqn: {GGUF name: (array (E, rows, row bytes or row weights), type)}}: llama.cpp
    holds each projection of a layer's experts as one 3-D tensor (`blk.N.ffn_{gate,up,down}_exps`)
    of one type, so every expert of a projection must be stored alike (refused otherwise)."""
    if adapter.moe is None:
        return {}
    out = {}
    for i, block in enumerate(adapter.blocks(model)):
        experts = block.get_submodule(adapter.moe.expert_prefix())
        layer = {}
        for proj, name in _EXPS.items():
            mods = [getattr(e, proj) for e in experts]
            kinds = {gguf_type_of(m) for m in mods}
            if len(kinds) > 1:
                raise LLMPressError(f"GGUF export: the experts' {proj} of block {i} are stored as {sorted(kinds)}; "
                                    "llama.cpp holds them in one tensor of one type: give them one method")
            kind = kinds.pop()
            if kind == "F32":                                 # dense, pruned, low-rank: their dense weights
                data = np.stack([(m.dense_weight() if isinstance(m, CompressedLinear) else m.weight.float())
                                 .contiguous().numpy() for m in mods])
                kind = float_type
                data = data.astype(np.float16 if float_type == "F16" else np.float32)
            elif isinstance(mods[0], GGMLLinear):
                data = np.stack([m.raw.contiguous().numpy() for m in mods])
            else:
                data = np.stack([ENCODERS[kind](m.int_weight(), m.scale) for m in mods])
            layer[f"blk.{i}.{name}.weight"] = (data, kind)
        out[f"{adapter.blocks_path}.{i}.{adapter.moe.expert_prefix()}"] = layer
    return out


def _finish(writer, tmp: Path, out: Path | None) -> None:
    """Write a GGUFWriter's header, metadata and tensors to its temporary file `tmp`, then (with
    out) move it into place; the temporary file is removed if anything fails."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if out is not None:
            shutil.move(str(tmp), str(out))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_lora(tensors: dict[str, np.ndarray], out: Path) -> None:
    """A llama.cpp LoRA adapter: general.type = adapter, adapter.type = lora, tensors
    `<base tensor>.lora_a` (r, in) and `.lora_b` (out, r) in F16 (the factors' stored type)."""
    import gguf
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)     # 0: scale = the user's adapter scale
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    _finish(writer, tmp, out)
