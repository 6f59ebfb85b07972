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


def check_damp(damp: float) -> None:
    if not 0 < damp <= 1:
        raise LLMPressError(f"damp (relative to the mean Hessian diagonal) must be in (0, 1], got {damp!r}")
