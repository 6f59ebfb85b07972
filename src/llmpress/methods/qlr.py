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


START = ("lora", "svd")


def lora_init(out_features: int, in_features: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's LoRA initialization as (up (out, r), down (r, in)): down ~ Kaiming-uniform with
    a = sqrt(5) (bound 1 / sqrt(in)), up = 0, so the adapter starts as exactly zero (QLoRA's start),
    from a seeded generator (the same layer shape gives the same factors)."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / in_features ** 0.5
    return torch.zeros(out_features, rank), (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound


@dataclass(frozen=True)
class ApiQ(MethodConfig):
    """GPTQ on a b-bit grid plus a rank-r adapter whose factors are fitted, block by block, so that
    the quantized block plus its adapters reproduces the uncompressed model's block outputs (ApiQ-bw:
    Liao et al. 2024, "ApiQ: Finetuning of 2-Bit Quantized Large Language Model", arXiv:2402.05147;
    its code trains LoRA and the clipping together on MSE(Y_fp, F_q(X_q)) + MSE(F_fp(X_q), F_q(X_q)),
    which llmpress.tune.tune_block does with the group scales in the clipping's place).

    start: the factors before the block fit: "lora" (PEFT's init: up = 0, as ApiQ's code) or "svd"
    (the whitened-SVD correction of gptq-lr). epochs: passes of the block fit over the calibration
    windows; epochs=0 with start=lora is QLoRA's zero-init adapter on the GPTQ base (the baseline
    ApiQ is measured against). saliency > 0 adds the saliency-weighted weight-change term of Cao &
    Aref 2025 (llmpress.tune) with this weight. Stored like gptq-lr (the factors fp16); exports as
    the quantized base plus a PEFT or GGUF LoRA adapter. Fine-tune the adapters afterwards with
    llmpress.recover.train_adapters (CLI --recover)."""
    method = "apiq"
    family = "composite"
    stat = "hessian"
    bits: int = 2
    group_size: int = 64
    rank: int = 16
    symmetric: bool = True
    act_order: bool = True
    damp: float = 0.01
    clip: str | None = "mse"
    start: str = "lora"
    epochs: int = 4
    lr: float = 5e-3           # the scales' relative step (ApiQ's code: 5e-3 for the clipping)
    factor_lr: float = 5e-4    # the factors' step (ApiQ's code: 5e-4 for LoRA)
    saliency: float = 0.0

    def validate(self) -> None:
        check_quant_options(self.bits, self.group_size, self.clip)
        check_damp(self.damp)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LLMPressError(f"rank must be a positive integer, got {self.rank!r}")
        if self.start not in START:
            raise LLMPressError(f"start must be one of {START}, got {self.start!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise LLMPressError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if not (self.lr > 0 and self.factor_lr > 0):
            raise LLMPressError(f"lr and factor_lr must be positive, got {self.lr!r}, {self.factor_lr!r}")
        if not self.saliency >= 0:
            raise LLMPressError(f"saliency (the weight of the saliency term) must be >= 0, got {self.saliency!r}")
        if self.saliency and not self.epochs:
            raise LLMPressError("saliency weights the block fit: it needs epochs > 0")

    def storage(self, out_features, in_features):
        return GPTQLowRank.storage(self, out_features, in_features)

    def base(self) -> GPTQ:
        return GPTQ(self.bits, self.group_size, self.symmetric, self.act_order, self.damp, self.clip)

    def block_fit(self) -> dict | None:
        """What the walk fits after this layer's block is compressed (llmpress.tune.tune_block), or None."""
        if not self.epochs:
            return None
        return {"epochs": self.epochs, "lr": self.lr, "factor_lr": self.factor_lr, "factors": True,
                "norms": False, "saliency_weight": self.saliency}


def solve_group_apiq(linears, config: ApiQ, stats):
    """GPTQ on the stacked group, then each member's starting factors (the block fit comes later)."""
    out = []
    gram = stats.hessian() if config.start == "svd" else None
    for m, (quant, info) in zip(linears, solve_group(linears, config.base(), stats)):
        w = m.weight.detach().float()
        rank = min(config.rank, *w.shape)
        if config.start == "svd":
            up, down, damp = lowrank_correction(w - quant.dense_weight(), gram, rank)
            info = {**info, "correction_damp": damp}
        else:
            up, down = lora_init(*w.shape, rank)
        quant.bias = None
        out.append((QuantLowRankLinear(quant, up, down, m.bias), {**info, "rank": rank, "start": config.start}))
    return out


@register(ApiQ, group_solver=solve_group_apiq)
def apply_apiq(linear, config: ApiQ, stats):
    return solve_group_apiq([linear], config, stats)[0]
