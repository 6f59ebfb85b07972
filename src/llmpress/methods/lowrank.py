"""Low-rank factorization W (out, in) ~= up (out, r) @ down (r, in).

`svd`: truncated SVD (Eckart-Young: optimal in Frobenius norm of the weight, blind to the inputs).
The rank follows from a parameter ratio: r * (out + in) <= ratio * out * in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.modules import LowRankLinear


def rank_for_ratio(out_f: int, in_f: int, param_ratio: float) -> int:
    r = int(param_ratio * out_f * in_f // (out_f + in_f))
    if r < 1:
        raise LLMPressError(f"param_ratio {param_ratio} leaves rank 0 for a {out_f}x{in_f} layer")
    return min(r, min(out_f, in_f))


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> up (out, r), down (r, in), with sqrt(S) split evenly between the two."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


class _LowRankConfig(MethodConfig):
    """Shared by the SVD variants: a rank from `param_ratio`, stored as two fp16 factors."""
    family = "low-rank"
    menu = tuple({"param_ratio": r / 10} for r in range(3, 10))

    def storage(self, out_features, in_features):
        r = rank_for_ratio(out_features, in_features, self.param_ratio)
        return 2 * r * (out_features + in_features), r * (out_features + in_features)


def check_ratio(param_ratio: float) -> None:
    if not 0 < param_ratio < 1:
        raise LLMPressError(f"param_ratio must be in (0, 1), got {param_ratio!r}")


@dataclass(frozen=True)
class SVD(_LowRankConfig):
    method = "svd"
    param_ratio: float = 0.8

    def validate(self) -> None:
        check_ratio(self.param_ratio)


@register(SVD)
def apply_svd(linear, config: SVD, stats):
    w = linear.weight.detach().float()
    up, down = svd_factors(w, rank_for_ratio(*w.shape, config.param_ratio))
    return LowRankLinear(up, down, linear.bias), {"rank": up.shape[1]}


def asvd_factors(w: torch.Tensor, abs_mean: torch.Tensor, rank: int, alpha: float):
    """ASVD: Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing
    Large Language Models" (arXiv:2312.05821). Scale input channel j by s_j = mean|X_j|^alpha so the
    SVD truncates where activations are small: W ~= (W S)_r S^-1. w (out, in), abs_mean (in,)."""
    s = abs_mean.double().clamp(min=1e-6 * abs_mean.max().item() + 1e-12) ** alpha   # (in,)
    up, down = svd_factors((w.double() * s[None, :]).float(), rank)
    return up, (down.double() / s[None, :]).float()


def whitened_svd(w: torch.Tensor, gram: torch.Tensor, damp: float = 0.0):
    """SVD-LLM: Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
    Language Model Compression" (arXiv:2403.07378). With the Cholesky factor L of the input Gram
    matrix (L L^T = X^T X), SVD(W L) = U S V^T and W' = U_r S_r V_r^T L^-1, the output error
    ||(W - W') X||_F^2 equals the sum of the discarded s_i^2: truncation maps directly to loss.

    w (out, in), gram (in, in) -> (U, S, Vh, L, damping used), float64. A Gram matrix that is not
    positive definite (dead or collinear inputs) is damped by multiples of its mean diagonal until
    Cholesky succeeds."""
    g = gram.double()
    mean_diag = torch.diagonal(g).mean().clamp(min=1e-12)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for rel in (damp, 1e-6, 1e-4, 1e-2, 1e-1):
        if rel < damp:
            continue
        lower, info = torch.linalg.cholesky_ex(g + rel * mean_diag * eye)
        if info.item() == 0:
            break
    else:
        raise LLMPressError("SVD-LLM: the input Gram matrix is not positive definite even with damping 0.1")
    u, s, vh = torch.linalg.svd(w.double() @ lower, full_matrices=False)
    return u, s, vh, lower, rel


def whitened_factors(u, s, vh, lower, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    up = u[:, :rank] * root                                            # (out, r)
    # down = root * Vh_r @ L^-1, i.e. solve  down @ L = root * Vh_r  (L lower triangular)
    down = torch.linalg.solve_triangular(lower, root[:, None] * vh[:rank], upper=False, left=False)
    return up.float(), down.float()


def whitened_svd_factors(w: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = 0.0):
    """-> (up (out, r), down (r, in), damping used); see whitened_svd."""
    u, s, vh, lower, rel = whitened_svd(w, gram, damp)
    return (*whitened_factors(u, s, vh, lower, rank), rel)


@dataclass(frozen=True)
class ASVD(_LowRankConfig):
    method = "asvd"
    stat = "norms"
    param_ratio: float = 0.8
    alpha: float = 0.5

    def validate(self) -> None:
        check_ratio(self.param_ratio)
        if not 0 <= self.alpha <= 2:
            raise LLMPressError(f"alpha must be in [0, 2], got {self.alpha!r}")


@register(ASVD)
def apply_asvd(linear, config: ASVD, stats):
    w = linear.weight.detach().float()
    up, down = asvd_factors(w, stats.abs_mean(), rank_for_ratio(*w.shape, config.param_ratio), config.alpha)
    return LowRankLinear(up, down, linear.bias), {"rank": up.shape[1]}


@dataclass(frozen=True)
class SVDLLM(_LowRankConfig):
    method = "svd-llm"
    stat = "hessian"
    param_ratio: float = 0.8

    def validate(self) -> None:
        check_ratio(self.param_ratio)


@register(SVDLLM)
def apply_svd_llm(linear, config: SVDLLM, stats):
    w = linear.weight.detach().float()
    # same layer, same weights: address, version counter, shape and a checksum
    key = ("whitened_svd", linear.weight.data_ptr(), linear.weight._version, tuple(w.shape), w.sum().item())
    if key not in stats.memo:
        stats.memo.clear()                       # one layer at a time: bounded memory
        stats.memo[key] = whitened_svd(w, stats.hessian())
    u, s, vh, lower, damp = stats.memo[key]
    up, down = whitened_factors(u, s, vh, lower, rank_for_ratio(*w.shape, config.param_ratio))
    return LowRankLinear(up, down, linear.bias), {"rank": up.shape[1], "damp": damp}
