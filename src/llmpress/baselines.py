"""Allocation baselines from the field, for comparison with the table allocators: OWL's
outlier-weighted per-block sparsity and D-Rank's effective-rank per-layer ranks. Both read the
dense model's one-pass statistics (llmpress.walk.dense_statistics)."""
from __future__ import annotations

import math

import numpy as np
import torch


def owl_block_sparsity(model, stats_by_layer: dict, sparsity: float, m: float = 5.0, lamda: float = 0.08) -> list[float]:
    """OWL: Yin et al. 2023, "Outlier Weighed Layerwise Sparsity (OWL)" (arXiv:2310.05175). Per block,
    the outlier ratio D = share of Wanda scores |W_ij| ||X_j|| above m x their mean; blocks with more
    outliers keep more weights: density_i = (1 - S) + lamda-scaled (D_i - mean D) in [-lamda, lamda]."""
    from llmpress.arch import adapter_for
    adapter = adapter_for(model)
    prefix = adapter.blocks_path
    ratios = []
    for i in range(len(adapter.blocks(model))):
        scores = []
        for group in adapter.input_groups:
            for local in group:
                name = f"{prefix}.{i}.{local}"
                w = model.get_submodule(name).weight.detach().float()
                scores.append((w.abs() * stats_by_layer[name].col_norms()[None, :]).flatten())
        s = torch.cat(scores)
        ratios.append((s > m * s.mean()).float().mean().item())
    r = np.array(ratios)
    r = (r - r.min()) / max(r.max() - r.min(), 1e-12) * lamda * 2
    density = r - r.mean() + (1 - sparsity)
    return [float(1 - d) for d in density]


def effective_rank_ratios(model, stats_by_layer: dict, param_fraction: float) -> dict[str, float]:
    """Effective-rank allocation (as in D-Rank, Mi et al. 2025): rank_l proportional to the effective
    rank exp(H(p)), p = s / sum(s), of the layer's whitened spectrum (singular values of W L,
    L L^T = X^T X), scaled so the factors keep `param_fraction` of the parameters."""
    from llmpress.arch import adapter_for
    names = adapter_for(model).linear_names(model)
    erank, shapes = {}, {}
    for name in names:
        w = model.get_submodule(name).weight.detach().double()
        g = stats_by_layer[name].gram_matrix().double()
        lower = torch.linalg.cholesky(g + 1e-6 * torch.diagonal(g).mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
        s = torch.linalg.svdvals(w @ lower)
        p = s / s.sum()
        erank[name] = math.exp(-(p * torch.log(p.clamp(min=1e-30))).sum().item())
        shapes[name] = w.shape
    target = param_fraction * sum(o * i for o, i in shapes.values())
    # ranks r_l = c * erank_l, capped so that no layer keeps more than 95 % of its parameters
    lo, hi = 0.0, 1e4
    for _ in range(100):
        c = (lo + hi) / 2
        used = sum(min(c * erank[n], 0.95 * o * i / (o + i)) * (o + i) for n, (o, i) in shapes.items())
        lo, hi = (c, hi) if used < target else (lo, c)
    return {n: min(lo * erank[n] * (o + i) / (o * i), 0.95) for n, (o, i) in shapes.items()}
