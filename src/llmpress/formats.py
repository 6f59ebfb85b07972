"""Exports that load without llmpress: `dense` (a plain Hugging Face folder) and `compressed-tensors`
(pack-quantized, the format vLLM and transformers read).

- dense: every compressed layer merged back into a dense nn.Linear (sparse values scattered,
  low-rank factors multiplied, quantized weights dequantized): runs anywhere, saves nothing.
- compressed-tensors: each quantized layer's integer codes packed into int32 words with the
  compressed-tensors library's own packer, its scales, its shape; one config group per
  (bits, group size), targeting its layers by exact regular expressions; layers that are not
  quantized (sparse, low-rank, dense) are stored dense and not targeted. Symmetric grids whose
  group size divides the input size only: transformers cannot load asymmetric zero points today,
  and the format's group strategy has no shorter last group; such layers are refused with the
  reason (re-plan them, or export `dense`).
Layers with an online rotation (llmpress.rotate.rotate_online: a Hadamard on the input at run time)
are written dense with the rotation folded back, by both exports (and by the GGUF one): neither
format carries the runtime op, so their quantized form cannot be served there.
"""
from __future__ import annotations

import re
import sys
import shutil
from pathlib import Path

import torch
from torch import nn

from llmpress.arch import adapter_for
from llmpress.arch.moe import hub_module, hub_names, router_names
from llmpress.errors import LLMPressError
from llmpress.modules import CompressedLinear, GGMLLinear, QuantLinear, QuantLowRankLinear

FORMATS = ("compressed-tensors", "dense")


def densify(model: nn.Module, only_online: bool = False) -> nn.Module:
    """Replace every compressed layer of `model` (in place) by a dense nn.Linear holding its weight,
    online rotations folded back in (llmpress.rotate). only_online: just the layers that carry an
    online rotation, which no export format here can express (they are written dense)."""
    from llmpress.rotate import fold_online, folded_weight, online_rotation_of
    fold_online(model)                        # dense layers: weight W R -> W
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(d + ".") for d in done):
            continue                          # a part of a composite layer that is already merged
        if isinstance(module, CompressedLinear) and (not only_online or online_rotation_of(module) is not None):
            done.append(name)
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=model.dtype, device="meta")
            dense.weight = nn.Parameter(folded_weight(module).to(model.dtype), requires_grad=False)
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.to(model.dtype), requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, dense)
    return model


def check_compressed_tensors(model: nn.Module) -> dict[tuple[int, int], list[str]]:
    """{(bits, group size): [fqn, ...]} of the quantized layers, refusing what the format cannot hold."""
    groups: dict[tuple[int, int], list[str]] = {}
    problems = []
    for name in adapter_for(model).linear_names(model):
        m = model.get_submodule(name)
        if isinstance(m, GGMLLinear):
            problems.append(f"{name}: GGUF grid {m.type.name} (its scales and offsets have no "
                            "compressed-tensors form; export --format gguf)")
            continue
        if not isinstance(m, QuantLinear):
            continue
        if not m.symmetric:
            problems.append(f"{name}: asymmetric zero points (transformers does not load them)")
        elif m.in_features % m.group_size and m.n_groups > 1:
            problems.append(f"{name}: group size {m.group_size} does not divide its {m.in_features} inputs")
        # one group spanning the inputs is the format's per-channel strategy (group size 0 here)
        groups.setdefault((m.bits, 0 if m.n_groups == 1 else m.group_size), []).append(name)
    if problems:
        raise LLMPressError("cannot export to compressed-tensors: " + "; ".join(problems[:3]) +
                            (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "") +
                            ". Re-plan those layers (symmetric, a group size dividing the inputs) or export dense")
    return groups


def lowrank_corrections(model: nn.Module) -> list[str]:
    """Names of the quantized layers that carry a low-rank correction (gptq-lr)."""
    return [n for n, m in model.named_modules() if isinstance(m, QuantLowRankLinear)]


def split_corrections(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Replace every gptq-lr layer of `model` (in place) by its quantized base; returns the
    corrections as PEFT LoRA tensors (lora_A = down (r, in), lora_B = up (out, r)) and their ranks."""
    names = lowrank_corrections(model)
    if not names:
        raise LLMPressError("the model has no quantized layers with a low-rank correction (gptq-lr)")
    tensors, ranks = {}, {}
    for name in names:
        m = model.get_submodule(name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.down.clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.up.clone()
        ranks[name] = m.rank
        base_layer = m.quant
        base_layer.bias = m.bias                   # the base layer carries the bias again
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, base_layer)
    return tensors, ranks


def write_lora_adapter(tensors: dict[str, torch.Tensor], ranks: dict[str, int], out: str | Path, base: str = "") -> Path:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) with alpha = r
    per layer (scaling 1), so base + adapter computes exactly Q x + up (down x)."""
    import json
    from safetensors.torch import save_file
    out = Path(out)
    if out.exists():
        raise LLMPressError(f"{out} already exists")
    r = max(ranks.values())
    # exact-name patterns: peft matches rank_pattern / alpha_pattern keys as regexes on module names
    pattern = {"^" + re.escape(n) + "$": k for n, k in ranks.items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern,
              "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True}
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_compressed_tensors(model: nn.Module, tokenizer, out: str | Path, adapter_out: str | Path | None = None) -> Path:
    """Write `model` (an llmpress-compressed model) as a compressed-tensors pack-quantized folder.
    Layers with a low-rank correction (gptq-lr): with adapter_out, the quantized base goes into
    the folder and the corrections into a PEFT LoRA adapter folder; without, they are written dense."""
    densify(model, only_online=True)          # no runtime rotation in this format: those layers go dense
    adapter = None
    if adapter_out is not None:
        if Path(adapter_out).exists():
            raise LLMPressError(f"{adapter_out} already exists")
        adapter = split_corrections(model)
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as e:
        raise LLMPressError(f"the compressed-tensors export needs `pip install 'llmpress[export]'` ({e})")
    groups = check_compressed_tensors(model)
    if not groups:
        raise LLMPressError("the model has no quantized layers; export it as `dense`")
    for names in groups.values():             # before any work: a fused-expert layout has no per-expert target
        for n in names:
            hub_module(model.config, n)
    tensors: dict[str, torch.Tensor] = {}
    quantized = {n for names in groups.values() for n in names}
    for name in quantized:
        m = model.get_submodule(name)
        signed = (m.int_weight().to(torch.int16) - 2 ** (m.bits - 1)).to(torch.int8)       # (out, in)
        tensors[f"{name}.weight_packed"] = pack_to_int32(signed, m.bits)
        tensors[f"{name}.weight_scale"] = m.scale.to(model.dtype)                           # (out, G)
        tensors[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features])
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.to(model.dtype)
    rest = densify(_without(model, quantized))
    config_groups = {
        f"group_{k}": QuantizationScheme(
            targets=["re:^" + re.escape(hub_module(model.config, n)) + "$" for n in names],
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                                     strategy="group" if group_size else "channel", group_size=group_size or None))
        for k, ((bits, group_size), names) in enumerate(sorted(groups.items()))}
    qconfig = QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                                 quantization_status="compressed",
                                 ignore=["lm_head", *router_names(model.config)])
    folder = write_hf_folder(rest, tokenizer, out, tensors, qconfig.to_dict())
    if adapter is not None:
        write_lora_adapter(*adapter, adapter_out, str(Path(out).resolve()))
    return folder


def export_dense(model: nn.Module, tokenizer, out: str | Path) -> Path:
    return write_hf_folder(densify(model), tokenizer, out)


class _Placeholder(nn.Module):
    """Stands in for a layer whose tensors are written separately (keeps densify off it)."""


def _without(model: nn.Module, names: set[str]) -> nn.Module:
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, _Placeholder())
    return model


def write_hf_folder(model: nn.Module, tokenizer, out, extra: dict | None = None,
                    quantization_config: dict | None = None, max_shard_bytes: int | None = None) -> Path:
    """A plain Hugging Face folder: the model's tensors (tied ones once) plus `extra` tensors, in one
    `model.safetensors` or, with max_shard_bytes, in shards with an index; config (its GGUF
    quantization_config dropped, ours set when given) and tokenizer. Written to a temporary folder
    beside `out`, then renamed."""
    import json
    from safetensors.torch import save_file
    from llmpress.export import _dedup_state_dict
    out = Path(out)
    if out.exists():
        raise LLMPressError(f"{out} already exists")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors, _ = _dedup_state_dict(model)
        tensors = {k: v.contiguous() for k, v in {**tensors, **(extra or {})}.items()}
        tensors = hub_names(model.config, tensors)     # MoE experts as the architecture's checkpoints name them
        if max_shard_bytes is None:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            shards: list[dict[str, torch.Tensor]] = [{}]
            size = 0
            for name, t in tensors.items():
                nbytes = t.numel() * t.element_size()
                if shards[-1] and size + nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][name] = t
                size += nbytes
            weight_map = {}
            for k, shard in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = model.config
        if hasattr(config, "quantization_config"):      # a GGUF source's: these weights are plain
            del config.quantization_config
        if quantization_config is not None:
            config.quantization_config = quantization_config
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_folder(folder, fmt: str, out, embedding_type: str | None = None, adapter_out: str | None = None) -> None:
    """`llmpress export`: the llmpress folder `folder` written as `fmt` (gguf, compressed-tensors, dense) at `out`."""
    from llmpress.export import load_compressed, read_manifest
    folder, out = str(folder), str(out)
    manifest = read_manifest(folder)                        # an llmpress folder, before anything heavy
    if Path(out).exists():
        raise LLMPressError(f"{out} already exists")
    if fmt == "gguf":               # an architecture the writer does not know: refused before loading
        from llmpress.gguf_arch import gguf_arch
        from transformers import AutoConfig
        gguf_arch(AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False))
    model, tokenizer = load_compressed(folder, runtime="rebuild")      # read, not run
    from llmpress.modules import RoutedLowRankLinear
    routed = [n for n, m in model.named_modules() if isinstance(m, RoutedLowRankLinear)]
    if routed:
        raise LLMPressError(f"{len(routed)} layer(s) ({routed[0]} ...) are PARSE layers, whose rank components each "
                            f"prompt chooses: no {fmt} file can carry that; they run in llmpress's runtime only")
    if fmt == "gguf":
        from llmpress.gguf_arch import check_exportable
        from llmpress.gguf_export import export_gguf
        for note in check_exportable(model.config):
            print(f"note: {note}", file=sys.stderr)
        from llmpress.models import resolve_source
        source = manifest.get("source_model")
        try:
            kind, where = resolve_source(source) if source else (None, None)
        except LLMPressError:
            kind = where = None
        fields = None
        if kind != "gguf":             # the vocabulary comes from the folder's Hugging Face tokenizer
            from llmpress.gguf_export import tokenizer_metadata
            try:
                if tokenizer is None:
                    raise LLMPressError("the folder has no tokenizer")
                fields, notes = tokenizer_metadata(tokenizer, model.config.vocab_size)
                for note in notes:
                    print(f"note: {note}", file=sys.stderr)
            except LLMPressError as e:
                print(f"note: the export carries no tokenizer metadata ({e}); transformers loads it, "
                      "llama.cpp needs a tokenizer", file=sys.stderr)
        types = export_gguf(model, out, where if kind == "gguf" else None, adapter_out=adapter_out,
                            tokenizer_fields=fields, embedding_type=embedding_type)
        counts = {t: list(types.values()).count(t) for t in sorted(set(types.values()))}
        print(f"{folder} -> {out} (gguf; tensor types {counts})")
        if adapter_out:
            print(f"low-rank corrections -> {adapter_out} (GGUF LoRA adapter: llama.cpp --lora {adapter_out})")
        return
    if embedding_type:
        raise LLMPressError("--embedding-type applies to --format gguf")
    corrected = lowrank_corrections(model)
    if adapter_out and (fmt != "compressed-tensors" or not corrected):
        raise LLMPressError("--adapter-out applies to --format compressed-tensors or gguf of a model with gptq-lr layers")
    if fmt == "compressed-tensors":
        written = export_compressed_tensors(model, tokenizer, out, adapter_out)
        if corrected and not adapter_out:
            print(f"note: {len(corrected)} gptq-lr layers (quantized + low-rank correction) were written dense; "
                  "--adapter-out DIR writes their quantized base here and the corrections as a LoRA adapter",
                  file=sys.stderr)
    else:
        written = export_dense(model, tokenizer, out)
    print(f"{folder} -> {written} ({fmt}; loads with transformers' from_pretrained, no trust_remote_code)")
    if adapter_out:
        print(f"low-rank corrections of {len(corrected)} layers -> {adapter_out} (PEFT LoRA adapter: load the base "
              f"with quantization_config=CompressedTensorsConfig(run_compressed=False), then "
              f"PeftModel.from_pretrained(model, {adapter_out!r}))")
