"""Magnitude pruning: drop the smallest |w| (Han et al. 2015, "Learning both Weights and
Connections"; the baseline of Wanda and SparseGPT), unstructured per layer or N:M along inputs.
`nm_mask` and `topk_mask` are shared with the calibrated pruners."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.modules import SparseLinear


def parse_nm(nm: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in str(nm).split(":"))
    except ValueError:
        raise LLMPressError(f"N:M must look like '2:4', got {nm!r}")
    if not 0 < n < m:
        raise LLMPressError(f"N:M needs 0 < N < M (N weights kept in every M), got {nm!r}")
    return n, m


def topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """True = kept. Exactly round(sparsity * count) lowest scores are dropped, per row or per tensor."""
    if per_row:
        k = round(sparsity * scores.shape[1])
        drop = torch.topk(scores, k, dim=1, largest=False).indices
        mask = torch.ones_like(scores, dtype=torch.bool)
        return mask.scatter_(1, drop, False)
    k = round(sparsity * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every run of m consecutive input columns. scores: (out, in)."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise LLMPressError(f"N:M with M={m} needs in_features divisible by {m}, got {in_f}")
    groups = scores.reshape(out_f, in_f // m, m)
    keep = torch.topk(groups, n, dim=2).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True).view(out_f, in_f)


def sparse_storage(nnz: int, out_f: int, in_f: int) -> tuple[int, int]:
    """(bytes, params) of a SparseLinear: fp16 kept values + a 1-bit mask."""
    return math.ceil(out_f * in_f / 8) + 2 * nnz, nnz


def kept_count(sparsity: float | None, nm: str | None, out_f: int, in_f: int) -> int:
    """Weights kept by magnitude's selection: N per M (N:M), or all but round(sparsity * n)."""
    if nm:
        keep_n, m = parse_nm(nm)
        return out_f * in_f // m * keep_n
    return out_f * in_f - round(sparsity * out_f * in_f)


SPARSITY_MENU = tuple({"sparsity": s / 10} for s in range(1, 10))


def check_sparsity_options(sparsity: float | None, nm: str | None) -> None:
    if (sparsity is None) == (nm is None):
        raise LLMPressError("give exactly one of sparsity (unstructured) or nm (e.g. '2:4')")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise LLMPressError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if nm is not None:
        parse_nm(nm)


@dataclass(frozen=True)
class Magnitude(MethodConfig):
    method = "magnitude"
    family = "pruning"
    menu = SPARSITY_MENU
    sparsity: float | None = 0.5
    nm: str | None = None

    def validate(self) -> None:
        check_sparsity_options(self.sparsity, self.nm)

    def storage(self, out_features, in_features):
        return sparse_storage(kept_count(self.sparsity, self.nm, out_features, in_features), out_features, in_features)


def magnitude_mask(w: torch.Tensor, sparsity: float | None, nm: str | None) -> torch.Tensor:
    scores = w.abs()
    return nm_mask(scores, *parse_nm(nm)) if nm else topk_mask(scores, sparsity)


@register(Magnitude)
def apply_magnitude(linear, config: Magnitude, stats):
    w = linear.weight.detach().float()
    return SparseLinear.from_dense(w, magnitude_mask(w, config.sparsity, config.nm), linear.bias), {}
