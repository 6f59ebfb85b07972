"""What the GGUF writer needs to know about each architecture, as data: llama.cpp's architecture
name, the tensor transforms its converter applies, and the hyper-parameter keys it writes.

Facts from llama.cpp's converter (convert_hf_to_gguf.py: LlamaModel, Qwen2Model, Qwen3Model,
Gemma2Model, Gemma3Model) and checked by loading the files in llama.cpp (tests/test_gguf_arch.py):
- q/k rows are permuted (interleaved rotary halves) only for the `llama` architecture, which Mistral
  is written as; qwen2 / qwen3 / gemma use the NEOX rotary layout, HF's own;
- Gemma stores RMSNorm weights w for x * (1 + w): the file holds w + 1 for every `*norm.weight`
  (gemma3's q/k norms included); the embedding scale sqrt(hidden) is applied by llama.cpp itself;
- tensor names come from gguf-py's per-architecture map (gemma's `ffn_norm` is its
  pre_feedforward_layernorm, its post_attention_layernorm is `post_attention_norm`);
- llama.cpp derives what it does not read: an absent `output.weight` ties the head to the
  embedding, an absent key_length is hidden / heads (so it is always written where head_dim
  differs), gemma2 / gemma3 use 1 / sqrt(head_dim) as the attention scale and fixed sliding-window
  patterns (every other layer, five of six layers): configs that differ are refused, not exported
  into a file that computes something else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmpress.errors import LLMPressError


@dataclass(frozen=True)
class GGUFArch:
    name: str                   # general.architecture, gguf.MODEL_ARCH member name in lower case
    permute_qk: bool = False    # llama's interleaved rotary layout
    norm_shift: float = 0.0     # added to every `*norm.weight` (Gemma's 1 + w)
    tied_only: bool = False     # no output tensor in the layout (gemma2)
    swa_pattern: int = 0        # llama.cpp's sliding-window pattern n: layer i slides iff i % n < n - 1

    def model_arch(self):
        import gguf
        return getattr(gguf.MODEL_ARCH, self.name.upper())


ARCHS = {
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),          # the converter writes Mistral as llama
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3"),
    "gemma2": GGUFArch("gemma2", norm_shift=1.0, tied_only=True, swa_pattern=2),
    "gemma3": GGUFArch("gemma3", norm_shift=1.0, swa_pattern=6),
    "gemma3_text": GGUFArch("gemma3", norm_shift=1.0, swa_pattern=6),
    # mixtures of experts: llama.cpp's converter writes Mixtral as llama with experts
    "qwen2_moe": GGUFArch("qwen2moe"),
    "qwen3_moe": GGUFArch("qwen3moe"),
    "mixtral": GGUFArch("llama", permute_qk=True),
}
# Not written (yet), and why: the export names these in its refusal.
LEFT_OUT = {
    "olmoe": "llama.cpp's olmoe disagrees with transformers by up to 5e-2 in next-token log-probability on a tiny "
             "random model (qwen2moe / qwen3moe / mixtral agree within 5e-3); not understood yet",
    "granitemoe": "llama.cpp's granitemoe needs the embedding / residual / attention / logit multipliers, not written yet",
}


# llama.cpp recognizes the 27B Gemma models by their layer count and scales their attention by
# 1/sqrt(hidden / heads) instead of 1/sqrt(head_dim)
LAYERS_27B = {"gemma2": 46, "gemma3": 62}


def gguf_arch(config) -> GGUFArch:
    model_type = getattr(config, "model_type", None)
    arch = ARCHS.get(model_type)
    if arch is None:
        why = f" ({LEFT_OUT[model_type]})" if model_type in LEFT_OUT else ""
        raise LLMPressError(f"GGUF export knows the architectures {', '.join(sorted(ARCHS))}; "
                            f"got {model_type!r}{why}")
    return arch


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config, kind: str = "full_attention") -> dict:
    """The rotary parameters of one attention kind: transformers 5 nests them per layer type for
    gemma3 ({'full_attention': {...}, 'sliding_attention': {...}}), flat otherwise."""
    params = getattr(config, "rope_parameters", None) or {}
    if kind in params:
        params = params[kind]
    elif "full_attention" in params or "sliding_attention" in params:
        params = next(iter(params.values()))
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return {**params, "rope_theta": 10000.0 if theta is None else float(theta)}


def check_exportable(config) -> list[str]:
    """Refuse (LLMPressError) what llama.cpp would compute differently from transformers; return
    notes for what only matters past some length."""
    arch = gguf_arch(config)
    notes = []
    rope = _rope(config)
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise LLMPressError(f"GGUF export: rotary scaling {kind!r} is not built (default, linear and llama3 are)")
    if kind == "llama3" and not arch.permute_qk:
        raise LLMPressError(f"GGUF export: llama3 rotary scaling on {config.model_type} is not built")
    if arch.swa_pattern:
        n = arch.swa_pattern
        want = ["sliding_attention" if i % n < n - 1 else "full_attention" for i in range(config.num_hidden_layers)]
        got = list(getattr(config, "layer_types", None) or want)
        if got != want:
            raise LLMPressError(f"GGUF export: llama.cpp runs {config.model_type} with a sliding window on layers "
                                f"i % {n} < {n - 1}; this model's layer types are {got}")
        scalar = getattr(config, "query_pre_attn_scalar", None)
        # llama.cpp scales attention by 1/sqrt(head_dim), except for the 27B layer counts (1/sqrt(hidden/heads))
        expect = (config.hidden_size // config.num_attention_heads
                  if config.num_hidden_layers == LAYERS_27B.get(arch.name) else head_dim(config))
        if scalar is not None and float(scalar) != float(expect):
            raise LLMPressError(f"GGUF export: llama.cpp scales {config.model_type} attention by 1/sqrt({expect}); "
                                f"this model's query_pre_attn_scalar is {scalar}")
        if arch.name == "gemma3" and getattr(config, "attn_logit_softcapping", None):
            raise LLMPressError("GGUF export: llama.cpp's gemma3 has no attention logit soft-capping")
    # llama.cpp's qwen3moe always renormalizes the top-k routing weights, its qwen2moe never does
    norm = getattr(config, "norm_topk_prob", None)
    if arch.name == "qwen3moe" and norm is False or arch.name == "qwen2moe" and norm is True:
        raise LLMPressError(f"GGUF export: llama.cpp's {arch.name} {'always' if arch.name == 'qwen3moe' else 'never'} "
                            f"renormalizes the top-k routing weights; this model's norm_topk_prob is {norm}")
    if arch.tied_only and not getattr(config, "tie_word_embeddings", True):
        raise LLMPressError(f"GGUF export: llama.cpp's {arch.name} layout has no separate output layer (tied only)")
    window = getattr(config, "sliding_window", None)
    if not arch.swa_pattern and window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        notes.append(f"llama.cpp's {arch.name} has no sliding window: attention past {window} tokens "
                     "differs from transformers' (as with llama.cpp's own converter)")
    return notes


def write_hparams(writer, config, n_blocks: int) -> None:
    """The hyper-parameter keys llama.cpp's converter writes for this architecture."""
    arch = gguf_arch(config)
    hd = head_dim(config)
    rope = _rope(config)
    writer.add_block_count(n_blocks)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    from llmpress.arch.moe import layout_of
    layout = layout_of(config)
    if layout is not None:                      # as the converter's TextModel / Qwen2MoeModel write them
        writer.add_expert_count(layout.num_experts(config))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        if layout.intermediate_key == "moe_intermediate_size":
            writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    if arch.name != "gemma2":                   # gemma2's base is always 10000, llama.cpp's default
        writer.add_rope_freq_base(rope["rope_theta"])
    if arch.name == "llama":
        writer.add_rope_dimension_count(hd)     # llama.cpp requires n_rot == key_length
        writer.add_vocab_size(config.vocab_size)
    if rope.get("rope_type") == "linear":
        import gguf
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if arch.name == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    if arch.swa_pattern:
        writer.add_sliding_window(int(config.sliding_window))
    if arch.name == "gemma3":
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_rope_freq_base_swa(_rope(config, "sliding_attention")["rope_theta"])


def extra_tensors(config) -> dict[str, np.ndarray]:
    """Tensors the converter adds that the model has no parameter for: llama3 rotary scaling is a
    `rope_freqs` factor per frequency (LlamaModel.generate_extra_tensors)."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return {}
    dim, base = head_dim(config), rope["rope_theta"]
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.asarray(factors, dtype=np.float32)}
