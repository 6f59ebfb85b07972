"""Wanda: Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
Models" (arXiv:2306.11695). Score |W_ij| * ||X_j||_2, compared within each output row; no update of
the kept weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.methods.magnitude import (SPARSITY_MENU, check_sparsity_options, kept_count, nm_mask, parse_nm,
                                       sparse_storage, topk_mask)
from llmpress.modules import SparseLinear


def wanda_mask(w: torch.Tensor, col_norms: torch.Tensor, sparsity: float | None, nm: str | None) -> torch.Tensor:
    """w (out, in), col_norms (in,) = ||X_j|| -> keep mask (out, in)."""
    scores = w.abs() * col_norms[None, :]
    return nm_mask(scores, *parse_nm(nm)) if nm else topk_mask(scores, sparsity, per_row=True)


@dataclass(frozen=True)
class Wanda(MethodConfig):
    method = "wanda"
    family = "pruning"
    stat = "norms"     # input channel norms only: no Gram matrix needed
    menu = SPARSITY_MENU
    sparsity: float | None = 0.5
    nm: str | None = None

    def validate(self) -> None:
        check_sparsity_options(self.sparsity, self.nm)

    def storage(self, out_features, in_features):
        # unstructured sparsity is per row: round(sparsity * in) dropped in each row
        nnz = (kept_count(None, self.nm, out_features, in_features) if self.nm else
               out_features * (in_features - round(self.sparsity * in_features)))
        return sparse_storage(nnz, out_features, in_features)


@register(Wanda)
def apply_wanda(linear, config: Wanda, stats):
    w = linear.weight.detach().float()
    return SparseLinear.from_dense(w, wanda_mask(w, stats.col_norms(), config.sparsity, config.nm), linear.bias), {}
