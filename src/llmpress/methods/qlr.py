"""Quantization + low-rank error correction: W ~= Q + U V, with Q = GPTQ(W) on a b-bit grid and
U (out, r) V (r, in) the best rank-r fit of the quantization error E = W - Q in the output space,
i.e. minimizing ||(E - U V) X||_F over the calibration inputs X.

That minimizer is the whitened SVD (as SVD-LLM whitens, see llmpress.methods.lowrank): with
L L^T = X^T X, SVD(E L) = A S B^T gives U V = A_r S_r B_r^T L^-1. This is the activation-aware
correction of EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with
Eigenspace Low-Rank Approximation", arXiv:2410.21271) and QERA (Zhang et al. 2024, "QERA: an
Analytical Framework for Quantization Error Reconstruction", arXiv:2410.06040), in the family of
ZeroQuant-V2's LoRC (Yao et al. 2023, arXiv:2303.08302) and LQER (Zhang et al. 2024,
arXiv:2402.02446). The factors are stored in fp16 and counted in the layer's cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.methods.gptq import GPTQ, solve_group
from llmpress.methods.hessian import check_damp
from llmpress.methods.lowrank import whitened_svd_factors
from llmpress.methods.rtn import check_quant_options, quant_storage
from llmpress.modules import QuantLowRankLinear


def lowrank_correction(error: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """error (out, in) = W - Q, gram (in, in) = X^T X / n -> (up (out, r), down (r, in), damping):
    the rank-r U V minimizing ||(error - U V) X||_F (whitened SVD)."""
    return whitened_svd_factors(error, gram, rank)


@dataclass(frozen=True)
class GPTQLowRank(MethodConfig):
    """GPTQ on a b-bit grid plus a rank-`rank` activation-whitened correction of its error."""
    method = "gptq-lr"
    family = "composite"
    stat = "hessian"
    menu = tuple({"bits": b, "group_size": 0, "rank": r} for b in (2, 3) for r in (4, 16))
    bits: int = 3
    group_size: int = 0         # per channel by default: the correction spends the bits groups would
    rank: int = 16
    symmetric: bool = True
    act_order: bool = True
    damp: float = 0.01
    clip: str | None = "mse"

    def validate(self) -> None:
        check_quant_options(self.bits, self.group_size, self.clip)
        check_damp(self.damp)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LLMPressError(f"rank must be a positive integer, got {self.rank!r}")

    def storage(self, out_features, in_features):
        nbytes, params = quant_storage(self.bits, self.group_size, self.symmetric, out_features, in_features)
        r = min(self.rank, out_features, in_features)
        return nbytes + 2 * r * (out_features + in_features), params

    def base(self) -> GPTQ:
        return GPTQ(self.bits, self.group_size, self.symmetric, self.act_order, self.damp, self.clip)


def solve_group_lowrank(linears, config: GPTQLowRank, stats):
    """GPTQ on the stacked group (shared Hessian), then one correction per member."""
    out = []
    gram = stats.hessian()
    for m, (quant, info) in zip(linears, solve_group(linears, config.base(), stats)):
        w = m.weight.detach().float()
        rank = min(config.rank, *w.shape)
        up, down, damp = lowrank_correction(w - quant.dense_weight(), gram, rank)
        quant.bias = None                     # the composite holds the bias
        out.append((QuantLowRankLinear(quant, up, down, m.bias), {**info, "rank": rank, "correction_damp": damp}))
    return out


@register(GPTQLowRank, group_solver=solve_group_lowrank)
def apply_gptq_lowrank(linear, config: GPTQLowRank, stats):
    return solve_group_lowrank([linear], config, stats)[0]
