"""Non-uniform b-bit quantization: a look-up table of 2^b fp16 values per output row, indices chosen
with GPTQ's error feedback.

A weight is stored as a b-bit index into its row's table, W[r, j] = T[r, code[r, j]]. Three steps:
1. the table of each row is a k-means (Lloyd) of the row's weights, each weight counted with the
   Hessian diagonal h_jj = mean x_j^2 (the error it causes alone). SqueezeLLM (Kim et al. 2023,
   "SqueezeLLM: Dense-and-Sparse Quantization", arXiv:2306.07629) weights its per-row k-means by
   the Fisher diagonal for the same reason;
2. the indices are chosen column by column (act-order), each column's rounding error spread over
   the columns not yet quantized through the inverse Hessian, as GPTQ does for a uniform grid
   (Frantar et al. 2022, arXiv:2210.17323; GPTVQ, van Baalen et al. 2024, arXiv:2402.15319, does
   the same with vector codebooks);
3. the table is re-fitted to the chosen indices by least squares under H, the exact minimizer of
   ||(W - Q) X||^2 for fixed indices, so this step can only lower the layer's output error.

Cost: b bits per weight plus 2^b fp16 values per row (3 bits on 576 inputs: 3.22 bits per weight).
On the rotated embedded model, 2-bit tables (2.09 bits per weight) give WikiText-2 perplexity 116.9
against 185.2 for asymmetric 2-bit GPTQ with group 64 (2.28 bits per weight); at 3 bits 31.9 at
3.19 bits per weight, between the per-channel (34.8 at 3.03) and group-64 (31.3 at 3.30) uniform
grids (bench/low_bits.py, bench/README.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.methods import hessian
from llmpress.methods.hessian import check_damp
from llmpress.modules import STORAGE_DTYPE, LUTLinear, pack_bits


def decision_points(table: torch.Tensor) -> torch.Tensor:
    """table (out, k) sorted along k -> (out, k - 1) midpoints between neighbouring entries."""
    return ((table[:, 1:] + table[:, :-1]) / 2).contiguous()


def nearest(w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """w (out, n), table (out, k) sorted along k -> (out, n) int64 index of each weight's nearest entry."""
    return torch.searchsorted(decision_points(table), w.contiguous())


def fit_tables(w: torch.Tensor, weights: torch.Tensor, bits: int, iters: int = 25) -> torch.Tensor:
    """w (out, in), weights (in,) >= 0 -> (out, 2^bits) sorted float32 tables, one weighted 1-D
    k-means per row (Lloyd's iterations from the row's quantiles; an empty cluster keeps its value)."""
    k = 2 ** bits
    w = w.float()
    sorted_w = w.sort(dim=1).values
    pos = ((torch.arange(k, device=w.device) + 0.5) / k * (w.shape[1] - 1)).round().long()
    table = sorted_w[:, pos].contiguous()                                       # (out, k) quantiles
    wt = weights.float().clamp(min=0).expand_as(w)                              # (out, in)
    for _ in range(iters):
        idx = nearest(w, table)
        num = torch.zeros_like(table).scatter_add_(1, idx, w * wt)
        den = torch.zeros_like(table).scatter_add_(1, idx, wt)
        new = torch.where(den > 0, num / den.clamp(min=1e-30), table).sort(dim=1).values
        if torch.equal(new, table):
            break
        table = new
    return table


def gptq_on_tables(w: torch.Tensor, h: torch.Tensor, table: torch.Tensor, act_order: bool = True,
                   damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """w (out, in), h (in, in), table (out, k) sorted -> (codes (out, in) int64, info): GPTQ's column
    sweep (blocks of 128 columns, lazy updates) with each column rounded to its row's nearest table
    entry. Falls back to nearest rounding (info says so) when H cannot be inverted."""
    out_f, in_f = w.shape
    w, h, _ = hessian.prepare(w, h)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(in_f, device=w.device)
    upper, used = hessian.inverse_cholesky(h[perm][:, perm], damp)
    if upper is None:
        return nearest(w, table), {"fallback": "nearest", "reason": "Cholesky failed at every damping"}
    w = w[:, perm]
    mid = decision_points(table)                                               # (out, k - 1), once
    codes = torch.empty(out_f, in_f, dtype=torch.long, device=w.device)

    def pick(w1, i, col, u):
        q = torch.searchsorted(mid, w1[:, i:i + 1].contiguous())              # (out, 1)
        codes[:, col] = q[:, 0]
        return table.gather(1, q)

    hessian.gptq_sweep(w, upper, pick)
    return codes[:, torch.argsort(perm)], {"damp": used}


def refit_tables(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, table: torch.Tensor,
                 ridge: float = 1e-6, rows_per_chunk: int = 256) -> torch.Tensor:
    """The tables (out, k) minimizing tr((W - T[codes]) H (W - T[codes])^T) for fixed codes: per row
    r, with A_r (in, k) the one-hot of its codes, T_r = (A_r^T H A_r)^-1 A_r^T H w_r. A ridge of
    `ridge` x the mean diagonal pulls toward the current table, which keeps unused entries where
    they are. Rows in chunks (the one-hot is out x in x k)."""
    k = table.shape[1]
    h = h.double()
    out = torch.empty_like(table)
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    for r0 in range(0, w.shape[0], rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        a = F.one_hot(codes[rows], k).to(h.dtype)                                   # (R, in, k)
        at_h = a.transpose(1, 2) @ h                                                # (R, k, in)
        m = at_h @ a                                                                # (R, k, k)
        b = (at_h @ w[rows].double()[:, :, None])[..., 0]                           # (R, k)
        lam = ridge * torch.diagonal(m, dim1=1, dim2=2).mean(1).clamp(min=1e-12)    # (R,)
        m = m + lam[:, None, None] * eye
        b = b + lam[:, None] * table[rows].double()
        out[rows] = torch.linalg.solve(m, b).to(table.dtype)
    return out


def layer_error(w: torch.Tensor, h: torch.Tensor, deq: torch.Tensor) -> float:
    d = (deq - w).double()
    return ((d @ h.double()) * d).sum().item()


def lut_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, act_order: bool = True, damp: float = 0.01,
                 iters: int = 25, refit: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """w (out, in), h (in, in) -> (codes (out, in) int64 in 0..2^bits-1, tables (out, 2^bits) fp16, info).
    Steps 1-3 of the module docstring; the re-fit is kept only where it lowers the error (after the
    tables are rounded to fp16, as stored)."""
    table = fit_tables(w, torch.diagonal(h), bits, iters).to(STORAGE_DTYPE).float()   # rounding keeps the order
    codes, info = gptq_on_tables(w, h, table, act_order, damp)
    if refit:
        before = layer_error(w, h, table.gather(1, codes))
        new = refit_tables(w.float(), h, codes, table).to(STORAGE_DTYPE).float()
        after = layer_error(w, h, new.gather(1, codes))
        if after < before:
            table = new
        info["refit_error_ratio"] = round(min(after, before) / before, 6) if before > 0 else 1.0
    return codes, table.to(STORAGE_DTYPE), info


@dataclass(frozen=True)
class GPTQLUT(MethodConfig):
    """b-bit indices into a per-row table of 2^b fp16 values (non-uniform grid), solved with GPTQ."""
    method = "gptq-lut"
    family = "quantization"
    stat = "hessian"
    menu = tuple({"bits": b} for b in (2, 3, 4))
    bits: int = 3
    act_order: bool = True
    damp: float = 0.01
    iters: int = 25          # Lloyd iterations for the initial tables
    refit: bool = True       # least-squares re-fit of the tables to the chosen indices

    def validate(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 4:
            raise LLMPressError(f"gptq-lut bits must be an integer in 1..4 (a table of 2^bits fp16 values per "
                                f"row), got {self.bits!r}")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise LLMPressError(f"iters must be an integer >= 0, got {self.iters!r}")
        check_damp(self.damp)

    def storage(self, out_features, in_features):
        nbytes = math.ceil(out_features * in_features * self.bits / 8) + out_features * 2 ** self.bits * 2
        return nbytes, out_features * in_features


def solve_group(linears, config: GPTQLUT, stats):
    """Rows are independent given the shared H and each has its own table: q/k/v solved stacked."""
    w = torch.cat([m.weight.detach() for m in linears]).float()                 # (sum out_k, in)
    codes, table, info = lut_quantize(w, stats.hessian(), config.bits, config.act_order, config.damp,
                                      config.iters, config.refit)
    out, start = [], 0
    for m in linears:
        rows = slice(start, start + m.out_features)
        start += m.out_features
        module = LUTLinear(m.in_features, m.out_features, config.bits, pack_bits(codes[rows], config.bits),
                           table[rows], m.bias)
        out.append((module.to(m.weight.device), dict(info)))
    return out


@register(GPTQLUT, group_solver=solve_group)
def apply_gptq_lut(linear, config: GPTQLUT, stats):
    return solve_group([linear], config, stats)[0]
