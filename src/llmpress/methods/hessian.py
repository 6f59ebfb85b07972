"""Shared linear algebra of the second-order methods (GPTQ, SparseGPT): the damped inverse Hessian
in the upper-Cholesky form both algorithms sweep over, with recorded escalation on failure."""
from __future__ import annotations

import torch

from llmpress.errors import LLMPressError

DAMP_STEPS = (1.0, 10.0, 100.0)   # multiples of the requested relative damping, tried in order


def prepare(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of w (out, in) and h (in, in) with dead input columns (never active, h_jj = 0) made
    harmless: h_jj = 1 and w[:, j] = 0, as in the GPTQ reference. Returns (w, h, dead mask)."""
    w, h = w.clone().float(), h.clone().double()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h, dead


def inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float | None]:
    """Upper Cholesky factor U of (h + lambda I)^-1 with lambda = d * damp * mean(diag h), trying
    the damping multiples in DAMP_STEPS. Returns (U float32, relative damping used) or (None, None)
    when every attempt fails (h far from positive definite)."""
    mean_diag = torch.diagonal(h).mean().clamp(min=1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for step in DAMP_STEPS:
        rel = damp * step
        lower, info = torch.linalg.cholesky_ex(h + rel * mean_diag * eye)
        if info.item() != 0:
            continue
        hinv = torch.cholesky_inverse(lower)
        upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            return upper.float(), rel
    return None, None


def gptq_sweep(w: torch.Tensor, upper: torch.Tensor, pick, step: int = 1, block: int = 128) -> None:
    """GPTQ's column sweep (Frantar et al. 2022, arXiv:2210.17323), shared by every solver that
    rounds onto some grid with its error feedback. w (out, in): the weights in visiting order
    (modified in place), upper (in, in): the upper Cholesky factor of the damped inverse Hessian in
    the same order. Columns are taken `step` at a time (a vector quantizer's `step` columns at once)
    in blocks of `block` columns (a multiple of step) with lazy updates of the later blocks:
    pick(w1, i, col, u) -> (out, step) the values chosen for columns col .. col + step - 1, given the
    block's working copy w1 (out, B) whose columns i .. are still unquantized and their (step, step)
    block u of `upper`. The error of each chosen column is spread over the later ones."""
    in_f = w.shape[1]
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()                                               # (out, B) updated in place
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(0, i2 - i1, step):
            q = pick(w1, i, i1 + i, u1[i:i + step, i:i + step])                # (out, step)
            for j in range(i, i + step):                                       # one column at a time, q fixed
                e = (w1[:, j] - q[:, j - i]) / u1[j, j]
                w1[:, j:].addr_(e, u1[j, j:], alpha=-1.0)                      # spread over later columns
                err1[:, j] = e
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]


def check_damp(damp: float) -> None:
    if not 0 < damp <= 1:
        raise LLMPressError(f"damp (relative to the mean Hessian diagonal) must be in (0, 1], got {damp!r}")


def toward_reference(w: torch.Tensor, stats, alpha: float, damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Asymmetric calibration (Li, Yin, Lee, Xiao & Panda 2025, "GPTAQ: Efficient Finetuning-Free
    Quantization for Asymmetric Calibration", first named GPTQv2, arXiv:2504.02692): fit the compressed layer on the
    compressed model's inputs X to the UNCOMPRESSED model's outputs W X_ref, not to W X.

    The least-squares weight for that target is W* = W X_ref^T X (X^T X)^-1 = W + W C G^-1 with
    C = (X_ref - X)^T X and G = X^T X (stats.cross, stats.gram_matrix()). Its residual is orthogonal
    to X, so for any Q: ||Q X - W X_ref||^2 = ||(Q - W*) X||^2 + const, i.e. running the usual
    solver (GPTQ, SparseGPT, whitened SVD) on W* with the same Hessian minimizes the asymmetric
    objective exactly. GPTAQ's closed form interleaves the same correction with GPTQ's column sweep;
    this splits it into the least-squares step and the unchanged solver. alpha in [0, 1] moves only
    that far toward W* (the reference code scales the correction by 0.25); G is damped by
    damp * mean(diag G) as GPTQ damps H. w (out, in) -> (W + alpha W C G^-1 (out, in) float32,
    ||shift|| / ||W||)."""
    if stats.cross is None:
        raise LLMPressError("asymmetric calibration needs statistics collected with a reference (dense) stream")
    g = stats.gram_matrix().double()
    g.diagonal().add_(damp * g.diagonal().mean().clamp(min=1e-12))
    lower, info = torch.linalg.cholesky_ex(g)
    if info.item() != 0:
        raise LLMPressError("asymmetric calibration: the damped Gram matrix is not positive definite")
    w64 = w.detach().double()
    shift = alpha * torch.cholesky_solve((w64 @ stats.cross.double()).T, lower).T     # (out, in)
    return (w64 + shift).float(), (shift.norm() / w64.norm().clamp(min=1e-30)).item()
