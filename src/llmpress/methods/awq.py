"""AWQ: Lin, Tang, Tang, Yang, Dang, Gan & Han 2023, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration" (arXiv:2306.00978).

Salient input channels (large mean |x|) are protected by scaling them up before round-to-nearest:
W' = Q(W diag(s)) diag(s)^-1 with s = mean|x|^alpha, alpha searched on a grid. The inverse scale is
folded into whatever produces the input (the preceding RMSNorm's weight, or the preceding linear's
output rows), so the stored layer is a plain QuantLinear and the model computes the same function.

Differences from the reference implementation, by design: the search minimizes each input group's
own output error sum_k ||(W_k - W'_k) X||^2, computed exactly from the shared Gram matrix X^T X (the
reference runs the enclosing attention / MLP module); the clipping search (clip="mse", the
reference's `auto_clip`) picks each group's range by the squared rounding error weighted by the
diagonal of the scaled inputs' Gram matrix, not by running the layer on sampled tokens. A group
with nothing to fold into (o_proj under grouped-query attention) is quantized with plain RTN, and
the report says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.methods.rtn import (RTN, apply_rtn, check_gguf_clip, check_quant_options, fix_gguf_grid, ggml_linear_from_codes,
                                  gguf_shape_problem, gguf_storage, quant_linear_from_codes, quant_storage, rtn_gguf,
                                  rtn_quantize)

N_GRID = 20


def awq_search(weights: list[torch.Tensor], gram: torch.Tensor, abs_mean: torch.Tensor, bits: int,
               group_size: int, symmetric: bool, clip: str | None = None,
               gguf: str | None = None) -> tuple[torch.Tensor, float, float]:
    """weights: the group's (out_k, in) matrices; gram (in, in) = X^T X / n; abs_mean (in,);
    gguf: quantize onto that llama.cpp grid instead (llmpress.methods.ggml_grid).
    Returns (scale s (in,), best alpha, relative output error at it)."""
    w = torch.cat(weights).float()                              # (sum out_k, in)
    x_mean = abs_mean.float().clamp(min=1e-8)
    ref = torch.einsum("oi,ij,oj->", w, gram, w)
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    for k in range(N_GRID):
        alpha = k / N_GRID
        s = x_mean ** alpha
        s = s / (s.max() * s.min()).sqrt()                      # keep the scaled weights' range sane
        delta = _rounded(w * s[None, :], bits, group_size, symmetric, clip, torch.diagonal(gram) / s ** 2,
                         gguf) / s[None, :] - w                  # (sum out_k, in)
        err = torch.einsum("oi,ij,oj->", delta, gram, delta).item()
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2] / max(ref.item(), 1e-30)


def _rounded(w, bits, group_size, symmetric, clip, weights, gguf) -> torch.Tensor:
    """w (out, in) -> its round-to-nearest weights on the grid (dequantized)."""
    if gguf:
        from llmpress.methods.ggml_grid import ggml_type, round_to_grid
        return round_to_grid(w, ggml_type(gguf), clip, weights)[1]
    q, scale, zero = rtn_quantize(w, bits, group_size, symmetric, clip, weights)
    g = torch.arange(w.shape[1], device=w.device) // (group_size or w.shape[1])
    return (q - zero[:, g]) * scale[:, g]


def _fold(block, adapter, head: str, s: torch.Tensor) -> str | None:
    """Divide the producer of the group's input by s; returns its name, or None if impossible."""
    from llmpress.rotate import online_rotation_of
    source = adapter.source_of(head)
    if source is None or online_rotation_of(block.get_submodule(head)) is not None:
        return None                                               # a runtime rotation sits in between
    producer = block.get_submodule(source)
    with torch.no_grad():
        if isinstance(producer, torch.nn.Linear):
            if producer.out_features != s.numel():
                return None                                       # e.g. v_proj -> o_proj under GQA
            producer.weight.div_(s[:, None].to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        elif hasattr(producer, "weight") and producer.weight.shape == s.shape:
            off = adapter.norm_offset                             # RMSNorm: y = x_hat * (off + weight)
            producer.weight.copy_(((off + producer.weight.float()) / s - off).to(producer.weight.dtype))
        else:
            return None
    return source


def awq_group_transform(block, adapter, head, members, configs, stats) -> dict:
    config = configs[0]
    if any(c != config for c in configs):
        return {"awq": "group members have different settings: plain RTN"}
    linears = [block.get_submodule(n) for n in members]
    s, alpha, rel_err = awq_search([m.weight.detach() for m in linears], stats.hessian(), stats.abs_mean(),
                                   config.bits, config.group_size, config.symmetric, config.clip, config.gguf)
    stats.memo.pop("awq_scale", None)
    if alpha == 0.0:
        return {"awq_alpha": 0.0, "awq_output_error": rel_err}
    folded = _fold(block, adapter, head, s)
    if folded is None:
        return {"awq": f"nothing to fold the scales into before {head}: plain RTN"}
    with torch.no_grad():
        for m in linears:
            m.weight.mul_(s[None, :].to(m.weight.dtype))
    stats.memo["awq_scale"] = s            # apply_awq's clipping search weighs by the scaled inputs
    return {"awq_alpha": alpha, "awq_output_error": rel_err, "awq_folded_into": folded}


@dataclass(frozen=True)
class AWQ(MethodConfig):
    method = "awq"
    family = "quantization"
    stat = "hessian"
    bits: int = 4
    group_size: int = 128       # 0: per channel
    symmetric: bool = True
    clip: str | None = None     # "mse": search each group's clipping range (AWQ's auto_clip)
    gguf: str | None = None     # q4_1|q5_1|q2_k|q3_k|q4_k|q5_k|q6_k: scale and round onto that llama.cpp grid

    def __post_init__(self) -> None:
        fix_gguf_grid(self)
        super().__post_init__()

    def validate(self) -> None:
        check_quant_options(self.bits, self.group_size, self.clip, None if self.gguf else self.symmetric)
        check_gguf_clip(self)

    def shape_problem(self, out_features, in_features):
        return gguf_shape_problem(self, in_features)

    def storage(self, out_features, in_features):
        if self.gguf:
            return gguf_storage(self, out_features, in_features)
        return quant_storage(self.bits, self.group_size, self.symmetric, out_features, in_features)


@register(AWQ, group_transform=awq_group_transform)
def apply_awq(linear, config: AWQ, stats):
    # the scales are already folded in by the group transform: what is left is round-to-nearest
    if config.clip is None or stats is None:
        rtn = RTN(config.bits, config.group_size, config.symmetric, config.clip, config.gguf)
        return apply_rtn(linear, rtn, None)
    s = stats.memo.get("awq_scale")         # absent when the group transform did not run: unscaled
    weights = torch.diagonal(stats.hessian()).float()
    if s is not None:
        weights = weights / s.float() ** 2
    w = linear.weight.detach().float()
    if config.gguf:
        return ggml_linear_from_codes(linear, config.gguf, *rtn_gguf(w, config.gguf, config.clip, weights)), {}
    q, scale, zero = rtn_quantize(w, config.bits, config.group_size, config.symmetric, config.clip, weights)
    return quant_linear_from_codes(linear, q, scale, zero, config.bits, config.group_size, config.symmetric), {}
