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


def check_ratio(param_ratio: float) -> None:
    if not 0 < param_ratio < 1:
        raise LLMPressError(f"param_ratio must be in (0, 1), got {param_ratio!r}")


@dataclass(frozen=True)
class SVD(MethodConfig):
    method = "svd"
    param_ratio: float = 0.8

    def validate(self) -> None:
        check_ratio(self.param_ratio)


@register(SVD)
def apply_svd(linear, config: SVD, stats):
    w = linear.weight.detach().float()
    up, down = svd_factors(w, rank_for_ratio(*w.shape, config.param_ratio))
    return LowRankLinear(up, down, linear.bias), {"rank": up.shape[1]}
