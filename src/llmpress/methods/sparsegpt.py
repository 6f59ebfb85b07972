"""SparseGPT: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot" (arXiv:2301.00774).

An OBS-style sweep like GPTQ's: columns left to right, each pruned weight's error compensated on
the remaining columns through the inverse Hessian. The mask is chosen adaptively per block of 128
columns by the OBS saliency w^2 / [H^-1]_jj^2 (unstructured), or per run of M columns (N:M).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.methods import hessian
from llmpress.methods.hessian import check_damp
from llmpress.methods.magnitude import (SPARSITY_MENU, check_sparsity_options, kept_count, magnitude_mask, nm_mask,
                                       parse_nm, sparse_storage, topk_mask)
from llmpress.modules import SparseLinear

BLOCK = 128


def sparsegpt_solve(w: torch.Tensor, h: torch.Tensor, sparsity: float | None, nm: str | None,
                    damp: float = 0.01, rows: list[int] | None = None):
    """w (out, in), h (in, in) -> (pruned and updated weight (out, in), keep mask (out, in), info).
    Unstructured: exactly round(sparsity * out_k * B) weights dropped in each block of B columns of
    each layer k, with rows = [out_1, out_2, ...] the row counts of layers stacked in w (an input
    group sharing h; default: one layer). The sweep is GPTQ's (hessian.gptq_sweep), the "rounding"
    of a column keeping its masked values: the same error feedback, in place."""
    out_f, in_f = w.shape
    rows = rows or [out_f]
    n, m = parse_nm(nm) if nm else (None, None)
    if m and in_f % m:
        nm_mask(w, n, m)   # raises the clear divisibility error
    w, h, dead = hessian.prepare(w, h)
    upper, used = hessian.inverse_cholesky(h, damp)
    if upper is None:
        mask = torch.cat([magnitude_mask(part, sparsity, nm) for part in w.split(rows)])
        return w * mask, mask, {"fallback": "magnitude", "reason": "Cholesky failed at every damping"}
    d = torch.diagonal(upper)                                  # (in,)
    mask = torch.ones(out_f, in_f, dtype=torch.bool, device=w.device)
    out = torch.empty_like(w)

    def pick(w1, i, col, u):
        # the mask of the columns from here on, chosen from the updated weights as the sweep reaches them:
        # per block of BLOCK columns and per layer (unstructured), per run of m columns (N:M)
        if nm and col % m == 0:
            mask[:, col:col + m] = nm_mask(w1[:, i:i + m].square() / d[col:col + m].square(), n, m)
        elif not nm and i == 0:
            saliency = w1.square() / d[col:col + w1.shape[1]].square()          # (out, B)
            mask[:, col:col + w1.shape[1]] = torch.cat([topk_mask(s, sparsity) for s in saliency.split(rows)])
        kept = torch.where(mask[:, col], w1[:, i], torch.zeros((), dtype=w1.dtype, device=w1.device))
        out[:, col] = kept
        return kept[:, None]
    block = BLOCK if not nm or BLOCK % m == 0 else m * max(1, BLOCK // m)    # an N:M run never spans two blocks
    hessian.gptq_sweep(w, upper, pick, block=block)
    return out, mask, {"damp": used}


@dataclass(frozen=True)
class SparseGPT(MethodConfig):
    method = "sparsegpt"
    family = "pruning"
    stat = "hessian"
    menu = SPARSITY_MENU
    sparsity: float | None = 0.5
    nm: str | None = None
    damp: float = 0.01

    def validate(self) -> None:
        check_sparsity_options(self.sparsity, self.nm)
        check_damp(self.damp)

    def storage(self, out_features, in_features):
        if self.nm:
            return sparse_storage(kept_count(None, self.nm, out_features, in_features), out_features, in_features)
        # round(sparsity * out * B) dropped in each block of B columns (the last may be narrower)
        nnz = sum(out_features * min(BLOCK, in_features - s) - round(self.sparsity * out_features * min(BLOCK, in_features - s))
                  for s in range(0, in_features, BLOCK))
        return sparse_storage(nnz, out_features, in_features)


def solve_group(linears, config: SparseGPT, stats):
    """Members of an input group share H and SparseGPT's sweep treats rows independently given it
    (the unstructured mask's quota is kept per layer): one inverse Hessian and one sweep for all."""
    rows = [m.out_features for m in linears]
    w, mask, info = sparsegpt_solve(torch.cat([m.weight.detach() for m in linears]), stats.hessian(),
                                    config.sparsity, config.nm, config.damp, rows)
    return [(SparseLinear.from_dense(wk, mk, m.bias), dict(info))
            for m, wk, mk in zip(linears, w.split(rows), mask.split(rows))]


@register(SparseGPT, group_solver=solve_group)
def apply_sparsegpt(linear, config: SparseGPT, stats):
    return solve_group([linear], config, stats)[0]
