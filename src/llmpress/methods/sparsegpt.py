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
                    damp: float = 0.01):
    """w (out, in), h (in, in) -> (pruned and updated weight (out, in), keep mask (out, in), info).
    Unstructured: exactly round(sparsity * out * B) weights dropped in each block of B columns."""
    out_f, in_f = w.shape
    n, m = parse_nm(nm) if nm else (None, None)
    if m and in_f % m:
        nm_mask(w, n, m)   # raises the clear divisibility error
    w, h, dead = hessian.prepare(w, h)
    upper, used = hessian.inverse_cholesky(h, damp)
    if upper is None:
        mask = magnitude_mask(w, sparsity, nm)
        return w * mask, mask, {"fallback": "magnitude", "reason": "Cholesky failed at every damping"}
    mask = torch.ones(out_f, in_f, dtype=torch.bool, device=w.device)
    for i1 in range(0, in_f, BLOCK):
        i2 = min(i1 + BLOCK, in_f)
        w1 = w[:, i1:i2].clone()                    # (out, B)
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        d = torch.diagonal(u1)                      # (B,)
        m1 = mask[:, i1:i2]
        if not nm:
            m1[:] = topk_mask(w1.square() / d.square(), sparsity)
        for i in range(i2 - i1):
            if nm and i % m == 0:
                m1[:, i:i + m] = nm_mask(w1[:, i:i + m].square() / d[i:i + m].square(), n, m)
            col = w1[:, i]
            pruned = torch.where(m1[:, i], col, torch.zeros_like(col))
            e = (col - pruned) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = pruned
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return w * mask, mask, {"damp": used}


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


@register(SparseGPT)
def apply_sparsegpt(linear, config: SparseGPT, stats):
    w, mask, info = sparsegpt_solve(linear.weight.detach(), stats.hessian(), config.sparsity, config.nm, config.damp)
    return SparseLinear.from_dense(w, mask, linear.bias), info
