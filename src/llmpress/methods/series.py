"""Series expansion at tensor level, data-free: W ~= Q_1 + Q_2 + ... + Q_K, each Q_k a b-bit
grouped quantization of what the terms before it left, R_{k-1} = W - (Q_1 + ... + Q_{k-1}),
R_0 = W. With round to nearest and each term's scale fitted to its residual, the residual shrinks
with every term (tests: the squared error falls more than 4x per 2-bit term); no calibration data
and no training (Zhang,
Cheng et al. 2024, "FP=xINT: A Low-Bit Series Expansion Algorithm for Post-Training Quantization",
arXiv:2412.06865, the tensor-level expansion; the paper's layer- and model-level expansions and
its AbelianAdd/Mul operators are not reproduced here).

Stored: K QuantLinears (codes + fp16 scales each), so a 2-bit, 2-term series costs what a 4-bit
layer costs plus one more set of scales; it runs as K low-bit matmuls (llmpress's runtime; the
dense and other exports merge the terms).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.methods.rtn import check_quant_options, quant_linear_from_codes, quant_storage, rtn_quantize
from llmpress.modules import QuantLinear, SeriesLinear


def series_terms(w: torch.Tensor, bits: int, terms: int, group_size: int, symmetric: bool = True,
                 clip: str | None = None) -> list[QuantLinear]:
    """w (out, in) -> `terms` bias-free QuantLinears; term k quantizes what the stored terms < k left of w."""
    shape = SimpleNamespace(in_features=w.shape[1], out_features=w.shape[0], bias=None)
    out = []
    residual = w.float().clone()
    for _ in range(terms):
        q, scale, zero = rtn_quantize(residual, bits, group_size, symmetric, clip)
        out.append(quant_linear_from_codes(shape, q, scale, zero, bits, group_size, symmetric))
        residual -= out[-1].dense_weight()
    return out


@dataclass(frozen=True)
class Series(MethodConfig):
    method = "series"
    family = "quantization"
    menu = ({"bits": 2, "terms": 2, "group_size": 128}, {"bits": 3, "terms": 2, "group_size": 128})
    bits: int = 2
    terms: int = 2
    group_size: int = 128
    symmetric: bool = True
    clip: str | None = None      # "mse": each term's clipping range searched on its residual

    def validate(self) -> None:
        check_quant_options(self.bits, self.group_size, self.clip, self.symmetric)
        if self.clip == "search":
            raise LLMPressError("series: clip=search is not supported; use clip=mse or none")
        if not isinstance(self.terms, int) or not 1 <= self.terms <= 4:
            raise LLMPressError(f"series: terms must be an integer in 1..4, got {self.terms!r}")

    def storage(self, out_features, in_features):
        nbytes, params = quant_storage(self.bits, self.group_size, self.symmetric, out_features, in_features)
        return self.terms * nbytes, params


@register(Series)
def apply_series(linear, config: Series, stats):
    terms = series_terms(linear.weight.detach().float(), config.bits, config.terms, config.group_size,
                         config.symmetric, config.clip)
    return SeriesLinear(terms, linear.bias), {}
