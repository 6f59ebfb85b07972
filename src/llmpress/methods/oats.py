"""Sparse + low-rank: W ~= S + L with S sparse and L of rank r, found by alternating projections in
the activation-scaled space. OATS: Zhang et al. 2024, "OATS: Outlier-Aware Pruning Through Sparse
and Low Rank Decomposition" (arXiv:2409.13652), Algorithm 1:

  W D  (D = diag ||X_j||, the input channel norms Wanda scores with)
  repeat: L = SVD_r(W D - S);  S = keep the largest |W D - L| (per row, Wanda's comparison group)
  W' = (S + L) D^-1

The kept parameters are split between the two parts: rank_ratio of the budget goes to the factors,
r (out + in) = rank_ratio * param_ratio * out * in, the rest to the nonzeros of S. Stored as a
SparseLinear (fp16 values + 1-bit mask) plus two fp16 factors, all counted in the cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.methods.magnitude import sparse_storage
from llmpress.modules import SparseLinear, SparseLowRankLinear


def oats_split(out_f: int, in_f: int, param_ratio: float, rank_ratio: float) -> tuple[int, int]:
    """-> (rank, nonzeros kept per row)."""
    budget = param_ratio * out_f * in_f
    rank = int(rank_ratio * budget // (out_f + in_f))
    per_row = int((budget - rank * (out_f + in_f)) // out_f)
    if rank < 1 or per_row < 1:
        raise LLMPressError(f"param_ratio {param_ratio} with rank_ratio {rank_ratio} leaves rank {rank} and "
                            f"{per_row} weights per row for a {out_f}x{in_f} layer")
    return min(rank, out_f, in_f), min(per_row, in_f)


def oats_decompose(w: torch.Tensor, col_norms: torch.Tensor, rank: int, per_row: int, iters: int):
    """w (out, in), col_norms (in,) -> (S (out, in) with `per_row` nonzeros per row, up (out, r), down (r, in))."""
    # float32: the alternation is approximate anyway, and float64 SVDs would triple its cost
    d = col_norms.float().clamp(min=1e-8 * col_norms.max().item() + 1e-12)        # (in,)
    wd = w.float() * d[None, :]
    s = torch.zeros_like(wd)
    for _ in range(iters):
        u, sv, vh = torch.linalg.svd(wd - s, full_matrices=False)
        low = (u[:, :rank] * sv[:rank]) @ vh[:rank]
        resid = wd - low
        keep = torch.topk(resid.abs(), per_row, dim=1).indices
        s = torch.zeros_like(wd).scatter_(1, keep, resid.gather(1, keep))
    u, sv, vh = torch.linalg.svd(wd - s, full_matrices=False)
    root = sv[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank] / d[None, :]
    return s / d[None, :], up, down


@dataclass(frozen=True)
class OATS(MethodConfig):
    method = "oats"
    family = "composite"
    stat = "norms"
    menu = tuple({"param_ratio": r / 10} for r in range(3, 10))
    param_ratio: float = 0.5      # parameters kept (nonzeros + factor entries) / dense parameters
    rank_ratio: float = 0.25      # share of the kept parameters in the low-rank factors
    iters: int = 20

    def validate(self) -> None:
        if not 0 < self.param_ratio < 1:
            raise LLMPressError(f"param_ratio must be in (0, 1), got {self.param_ratio!r}")
        if not 0 < self.rank_ratio < 1:
            raise LLMPressError(f"rank_ratio must be in (0, 1), got {self.rank_ratio!r}")
        if not isinstance(self.iters, int) or self.iters < 1:
            raise LLMPressError(f"iters must be a positive integer, got {self.iters!r}")

    def storage(self, out_features, in_features):
        rank, per_row = oats_split(out_features, in_features, self.param_ratio, self.rank_ratio)
        nbytes, nnz = sparse_storage(out_features * per_row, out_features, in_features)
        return nbytes + 2 * rank * (out_features + in_features), nnz + rank * (out_features + in_features)


@register(OATS)
def apply_oats(linear, config: OATS, stats):
    w = linear.weight.detach().float()
    rank, per_row = oats_split(*w.shape, config.param_ratio, config.rank_ratio)
    s, up, down = oats_decompose(w, stats.col_norms(), rank, per_row, config.iters)
    # by position, so that a kept entry that happens to be 0 still counts as kept: exactly per_row a row
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, torch.topk(s.abs(), per_row, dim=1).indices, True)
    sparse = SparseLinear.from_dense(s, mask)
    return SparseLowRankLinear(sparse, up, down, linear.bias), {"rank": rank, "kept_per_row": per_row}
