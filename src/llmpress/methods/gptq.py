"""GPTQ: Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (arXiv:2210.17323).

Columns are quantized left to right; each column's rounding error is spread over the columns not yet
quantized through the inverse Hessian H^-1 of the layer's inputs (H = X^T X / n), which minimizes
||W X - Q X||^2 greedily. Updates are applied lazily in blocks of columns (Algorithm 1).

refine=k then runs k sweeps of cyclic coordinate descent on the same objective and grid, starting
from GPTQ's codes (QuantEase: Behdin, Acharya, Gupta, Song, Hsu, Keerthi & Mazumder 2023, "QuantEase:
Optimization-based Quantization for Language Models", arXiv:2309.01885): each column in turn is
set to the grid point nearest its best value given all the others, which can only lower the error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.methods import ggml_grid, hessian
from llmpress.methods.hessian import check_damp
from llmpress.methods.rtn import (QUANT_MENU, check_quant_options, fix_gguf_grid, ggml_linear_from_codes, gguf_shape_problem,
                                  gguf_storage, quant_grid, quant_linear_from_codes, quant_storage, quantize_to_grid,
                                  rtn_quantize)


def gptq_solve(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool,
               act_order: bool = False, damp: float = 0.01, clip: str | None = None,
               grid: tuple[torch.Tensor, torch.Tensor] | None = None, refine: int = 0):
    """w (out, in), h (in, in) -> (codes (out, in), scale (out, G), zero (out, G), info).

    Groups are runs of `group_size` input columns in the original order (the last may be shorter;
    0: one group per row). Without act_order a group's grid is fitted when the sweep reaches it (on
    the error-updated weights); with act_order (columns visited by decreasing h_jj) or a single
    group, grids are fitted up front from the original weights ("static groups"), so the stored
    layout needs no permutation index. clip="mse": each grid's clipping range is searched for the
    smallest rounding error weighted by h_jj (quant_grid).
    grid=(scale, offset) (out, G): a fixed grid w = q * scale + offset per (row, group), fitted by
    the caller (a GGUF block type, llmpress.methods.ggml_grid), returned in place of (scale, zero).
    refine: coordinate-descent sweeps after the GPTQ pass (QuantEase), on the damped Hessian.
    If the damped Hessian cannot be inverted even at DAMP_STEPS x damp, falls back to RTN (info says so).
    """
    out_f, in_f = w.shape
    group_size = group_size or in_f
    w, h, dead = hessian.prepare(w, h)
    w_target, h_orig = w.clone(), h                    # original column order, for refine
    diag = torch.diagonal(h).float()
    n_groups = -(-in_f // group_size)
    static = act_order or n_groups == 1 or grid is not None
    scale_t = torch.empty(n_groups, out_f, device=w.device)   # transposed: one contiguous row per group
    zero_t = torch.empty(n_groups, out_f, device=w.device)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(in_f, device=w.device)
    if grid is not None:                               # zero_t holds the offsets
        scale_t, zero_t = grid[0].T.contiguous(), grid[1].T.contiguous()
    if static:
        for g in range(n_groups if grid is None else 0):
            cols = slice(g * group_size, (g + 1) * group_size)
            scale_t[g], zero_t[g] = quant_grid(w[:, cols], bits, symmetric, clip, diag[cols])
        w = w[:, perm]
        h = h[perm][:, perm]
    upper, used = hessian.inverse_cholesky(h, damp)
    if upper is None and grid is not None:
        q = ggml_grid.quantize(w[:, torch.argsort(perm)], grid[0].repeat_interleave(group_size, 1),
                               grid[1].repeat_interleave(group_size, 1), bits)
        return q, grid[0], grid[1], {"fallback": "rtn", "reason": "Cholesky failed at every damping"}
    if upper is None:
        q, scale, zero = rtn_quantize(w[:, torch.argsort(perm)], bits, group_size, symmetric, clip, diag)
        return q, scale, zero, {"fallback": "rtn", "reason": "Cholesky failed at every damping"}
    group_of = (perm // group_size).tolist()          # group of each visited column
    codes = torch.zeros(out_f, in_f, device=w.device)

    def pick(w1, i, col, u):
        g = group_of[col]
        if not static and col % group_size == 0:      # a group's grid fitted when the sweep reaches it
            scale_t[g], zero_t[g] = quant_grid(w1[:, i:i + group_size], bits, symmetric, clip,
                                               diag[col:col + group_size])
        s, z = scale_t[g], zero_t[g]
        if grid is None:
            q = quantize_to_grid(w1[:, i], s, z, bits)
            deq = (q - z) * s
        else:                                         # z is the offset: w = q s + z
            q = ggml_grid.quantize(w1[:, i], s, z, bits)
            deq = q * s + z
        codes[:, col] = q
        return deq[:, None]

    # Block width: a multiple of group_size near 128, so a group never straddles two blocks.
    hessian.gptq_sweep(w, upper, pick, block=group_size * max(1, 128 // group_size) if not static else 128)
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    info = {"damp": used}
    if refine:
        h_damped = h_orig.float() + used * torch.diagonal(h_orig).float().mean() * torch.eye(in_f, device=w.device)
        onto, back = ((lambda x, s, z: ggml_grid.quantize(x, s, z, bits), lambda q, s, z: q * s + z) if grid is not None else
                      (lambda x, s, z: quantize_to_grid(x, s, z, bits), lambda q, s, z: (q - z) * s))
        expand = lambda t: t.T.repeat_interleave(group_size, 1)[:, :in_f]      # (G, out) -> (out, in)
        codes, info["refine"] = refine_codes(w_target, h_damped, codes, expand(scale_t), expand(zero_t), bits,
                                             refine, onto, back)
    if dead.any():
        info["dead_columns"] = int(dead.sum())
    return codes, scale_t.T.contiguous(), zero_t.T.contiguous(), info


def refine_codes(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, bits: int, sweeps: int, onto, back) -> tuple[torch.Tensor, dict]:
    """Cyclic coordinate descent on tr((W' - W) H (W' - W)^T) over the grid (QuantEase), all rows at once.

    w (out, in) target, h (in, in) damped Hessian, codes (out, in) start, scale / zero (out, in) the
    grid of each weight (zero: the offset for GGUF grids); onto(x, s, z) -> codes, back(q, s, z) ->
    values. Column j's best value given the others is W'_j - G_j / h_jj with G = (W' - W) H kept up
    to date by rank-1 updates; its nearest grid point minimizes the error in that column exactly, so
    no sweep raises the error. Stops early when a sweep moves no code. Returns (codes, info)."""
    codes = codes.clone()
    deq = back(codes, scale, zero)                       # (out, in)
    g = (deq - w) @ h                                     # (out, in): the error's gradient / 2
    d = torch.diagonal(h)
    before = ((deq - w) * g).sum().item()
    done = 0
    for _ in range(sweeps):
        moved = 0
        for j in range(w.shape[1]):
            q = onto(deq[:, j] - g[:, j] / d[j], scale[:, j], zero[:, j])
            delta = back(q, scale[:, j], zero[:, j]) - deq[:, j]
            nz = int(torch.count_nonzero(delta))
            if nz:
                g.addr_(delta, h[j])
                deq[:, j] += delta
                codes[:, j] = q
                moved += nz
        done += 1
        if not moved:
            break
    after = ((deq - w) * ((deq - w) @ h)).sum().item()
    return codes, {"sweeps": done, "error_ratio": round(after / before, 6) if before > 0 else 1.0}


@dataclass(frozen=True)
class GPTQ(MethodConfig):
    method = "gptq"
    family = "quantization"
    stat = "hessian"
    menu = QUANT_MENU
    bits: int = 4
    group_size: int = 128       # 0: per channel (one scale per output row)
    symmetric: bool = True
    # static act-order: the default of llm-compressor ("static") and GPTQModel (desc_act); free at
    # inference since the groups keep their original column layout
    act_order: bool = True
    damp: float = 0.01
    clip: str | None = None     # "mse": search each group's clipping range (Hessian-weighted error)
    # q4_1|q5_1|q4_k|q5_k|q6_k: solve ON that llama.cpp grid (fixes bits, group_size = its sub-block),
    # so the GGUF export holds exactly these weights; grids fitted up front (static)
    gguf: str | None = None
    # coordinate-descent sweeps after the GPTQ pass (QuantEase); None / 0: off
    refine: int | None = None

    def __post_init__(self) -> None:
        fix_gguf_grid(self)
        super().__post_init__()

    def validate(self) -> None:
        check_quant_options(self.bits, self.group_size, self.clip)
        check_damp(self.damp)
        if self.refine is not None and (not isinstance(self.refine, int) or self.refine < 0):
            raise LLMPressError(f"refine (coordinate-descent sweeps) must be an integer >= 0, got {self.refine!r}")

    def shape_problem(self, out_features, in_features):
        return gguf_shape_problem(self, in_features)

    def storage(self, out_features, in_features):
        if self.gguf:
            return gguf_storage(self, out_features, in_features)
        return quant_storage(self.bits, self.group_size, self.symmetric, out_features, in_features)


def solve_group(linears, config: GPTQ, stats):
    """Members of an input group share H, and GPTQ treats rows independently given H: stack them."""
    w = torch.cat([m.weight.detach() for m in linears])              # (sum out_k, in)
    h = stats.hessian()
    grid = parts = None
    if config.gguf:       # the GGUF grid, fitted from the original weights (Hessian-weighted clip search)
        scale, offset, parts = ggml_grid.fit(w.float(), ggml_grid.ggml_type(config.gguf), config.clip,
                                             torch.diagonal(h).float())
        grid = (scale, offset)
    codes, scale, zero, info = gptq_solve(w, h, config.bits, config.group_size, config.symmetric,
                                          config.act_order, config.damp, config.clip, grid, config.refine or 0)
    out, start = [], 0
    for m in linears:
        rows = slice(start, start + m.out_features)
        start += m.out_features
        if config.gguf:
            module = ggml_linear_from_codes(m, config.gguf, codes[rows], {k: v[rows] for k, v in parts.items()})
        else:
            module = quant_linear_from_codes(m, codes[rows], scale[rows], zero[rows], config.bits,
                                             config.group_size, config.symmetric)
        out.append((module, dict(info)))
    return out


@register(GPTQ, group_solver=solve_group)
def apply_gptq(linear, config: GPTQ, stats):
    return solve_group([linear], config, stats)[0]
