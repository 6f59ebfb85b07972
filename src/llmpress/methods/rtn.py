"""Round-to-nearest (RTN) weight quantization onto a per-(row, group) uniform grid.

The baseline of every weight-only quantization paper (e.g. Dettmers et al. 2022, "LLM.int8()";
Frantar et al. 2022, "GPTQ", Table 1). `quant_grid` and `quantize_to_grid` are shared with GPTQ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.modules import STORAGE_DTYPE, QuantLinear, pack_bits


# MSE clipping: the range is shrunk by each of these factors and the one with the smallest
# (weighted) squared rounding error is kept, per row and group (GPTQ reference `mse` option,
# AWQ's `auto_clip`; 1.0 = no clipping).
CLIP_SHRINKS = tuple(1.0 - 0.02 * k for k in range(26))      # 1.00, 0.98, ..., 0.50


def quant_grid(w: torch.Tensor, bits: int, symmetric: bool, clip: str | None = None,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of w (rows, cols) over all its columns.

    Returns scale (rows,) rounded to the fp16 it is stored as, and zero (rows,) in [0, 2**bits - 1].
    Symmetric: zero = 2**(bits-1), q in [0, 2**bits - 1] covers [-absmax, absmax].
    Asymmetric: the range [min(w, 0), max(w, 0)] maps onto [0, 2**bits - 1].
    clip="mse": the range shrunk by the factor in CLIP_SHRINKS that minimizes each row's
    sum_j weights_j (w_ij - w'_ij)^2 (weights (cols,): e.g. the Hessian diagonal, so the error
    is measured where the inputs are large; uniform when None).
    """
    if clip is None:
        return _grid(w, bits, symmetric, 1.0)
    if clip == "search":
        return search_scale(w, bits, weights)

    def error(scale, zero):                                                      # (rows,)
        d = w - (quantize_to_grid(w, scale[:, None], zero[:, None], bits) - zero[:, None]) * scale[:, None]
        return (d * d) @ weights if weights is not None else (d * d).sum(1)

    return search_clip(clip, lambda shrink: _grid(w, bits, symmetric, shrink), error)


def _importance(w: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's per-weight importance: weights (cols,) or (rows, cols) (None: 1) times
    sqrt(sigma2 + w^2), sigma2 the mean w^2 of the row. w (rows, cols) -> (rows, cols)."""
    sigma2 = (w * w).mean(1, keepdim=True)
    if weights is not None and weights.dim() == 1:
        weights = weights[None]
    return torch.sqrt(sigma2 + w * w) * (weights if weights is not None else 1.0)


SCALE_STEPS = tuple(0.1 * k for k in range(-9, 10))     # llama.cpp's make_qx_quants: nmax + 0.1 k


def search_scale(w: torch.Tensor, bits: int, weights: torch.Tensor | None = None,
                 round_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance-weighted scale search of llama.cpp's imatrix quantizer (make_qx_quants in
    ggml-quants.c, I. Kawrakow 2024), for a symmetric b-bit grid w = (q - 2**(b-1)) * scale.

    w (rows, cols), weights (cols,) the importance of each column (the Hessian diagonal, i.e.
    llama.cpp's imatrix x n; or (rows, cols); None: equal). Each weight counts importance * sqrt(sigma2 + w^2)
    (sigma2 = the mean w^2 of the row's group), as llama.cpp weighs it. The grid keeps all
    2**b levels: the weight of largest magnitude (either sign) maps to the extreme level -nmax,
    so the scale is negative when that weight is positive. For each of the 19 inverse scales
    -(nmax + 0.1 k) / max, k = -9..9, codes are rounded to nearest and the scale set to the weighted
    least-squares fit sum(w x l) / sum(w l^2); the best fit (largest sum(w x l)^2 / sum(w l^2)) is
    kept. Returns scale (rows,) as stored (fp16; round_scale=False: float32, for a second-level
    rounding by the caller) and zero (rows,) = 2**(b-1)."""
    nmax = 2 ** (bits - 1)
    imp = _importance(w, weights)                                                        # (rows, cols)
    peak = w.gather(1, w.abs().argmax(1, keepdim=True))                                  # (rows, 1) signed
    safe = torch.where(peak != 0, peak, torch.ones_like(peak))
    best_score = torch.full_like(peak[:, 0], -1.0)
    best_scale = torch.zeros_like(peak[:, 0])
    for k in SCALE_STEPS:
        l = torch.clamp(torch.round(-(nmax + k) / safe * w), -nmax, nmax - 1)
        sumlx, suml2 = (imp * w * l).sum(1), (imp * l * l).sum(1)
        score = torch.where(suml2 > 0, sumlx * sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
        better = score > best_score
        best_scale = torch.where(better, sumlx / suml2.clamp(min=1e-30), best_scale)
        best_score = torch.where(better, score, best_score)
    if not round_scale:
        return best_scale, torch.full_like(best_scale, float(nmax))
    scale = best_scale.to(STORAGE_DTYPE).float()
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))              # an all-zero group
    return scale, torch.full_like(scale, float(nmax))


MIN_STEPS = tuple(-1.0 + 0.1 * k for k in range(21))     # llama.cpp's make_qkx2_quants: rmin -1, rdelta 0.1, 20 steps


def search_scale_min(w: torch.Tensor, bits: int, weights: torch.Tensor | None = None,
                     nonpositive: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance-weighted (scale, min) search of llama.cpp's imatrix quantizer for asymmetric
    grids (make_qkx2_quants / make_qkx3_quants in ggml-quants.c, I. Kawrakow 2023-24):
    w (rows, cols) -> (scale (rows,), low (rows,)) float32 (not rounded), the grid w = q * scale + low,
    q in 0..2**b - 1, low <= 0 (the K-quants' stored min; nonpositive=False: any low, Q4_1 / Q5_1). Weights as search_scale (importance * sqrt(sigma2 + w^2)). For
    each inverse scale (nmax + k) / (max - min), k in MIN_STEPS, codes are rounded to nearest and
    (scale, low) set to their weighted least-squares fit (low clamped to <= 0, the scale refitted
    then); the fit with the smallest weighted error is kept."""
    nmax = 2 ** bits - 1
    imp = _importance(w, weights)                                                        # (rows, cols)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if nonpositive:
        lo = lo.clamp(max=0)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    sw, swx = imp.sum(1), (imp * w).sum(1)
    best_err = torch.full_like(sw, float("inf"))
    best = (span[:, 0] / nmax, lo[:, 0])
    for k in MIN_STEPS:
        l = torch.clamp(torch.round((nmax + k) / span * (w - lo)), 0, nmax)
        swl, swl2, swlx = (imp * l).sum(1), (imp * l * l).sum(1), (imp * l * w).sum(1)
        det = sw * swl2 - swl * swl
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        scale = torch.where(ok, (sw * swlx - swl * swx) / safe, best[0])
        low = torch.where(ok, (swl2 * swx - swl * swlx) / safe, best[1])
        pos = (low > 0) & nonpositive                          # the stored min is <= 0: refit the scale alone
        scale = torch.where(pos, swlx / swl2.clamp(min=1e-30), scale)
        low = torch.where(pos, torch.zeros_like(low), low)
        d = l * scale[:, None] + low[:, None] - w
        err = (imp * d * d).sum(1)
        better = ok & (err < best_err)
        best = (torch.where(better, scale, best[0]), torch.where(better, low, best[1]))
        best_err = torch.where(better, err, best_err)
    return best


def search_clip(clip: str, grid_at, error) -> tuple[torch.Tensor, ...]:
    """The MSE clip search shared by every grid: grid_at(shrink) -> a grid (tuple of tensors of one
    shape), error(*grid) -> its rounding error in that shape; keeps, element by element, the grid
    of the factor in CLIP_SHRINKS with the smallest error."""
    if clip != "mse":
        raise LLMPressError(f"clip must be None or 'mse', got {clip!r}")
    best = best_err = None
    for shrink in CLIP_SHRINKS:
        grid = grid_at(shrink)
        err = error(*grid)
        if best is None:
            best, best_err = grid, err
            continue
        better = err < best_err
        best = tuple(torch.where(better, new, old) for new, old in zip(grid, best))
        best_err = torch.where(better, err, best_err)
    return best


def _grid(w: torch.Tensor, bits: int, symmetric: bool, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** bits - 1
    if symmetric:
        scale = w.abs().amax(dim=1) * shrink * 2 / qmax
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = w.amin(dim=1).clamp(max=0) * shrink
        hi = w.amax(dim=1).clamp(min=0) * shrink
        scale = (hi - lo) / qmax
    scale = _round_up_to_storage(scale) if shrink == 1.0 else scale.to(STORAGE_DTYPE).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def _round_up_to_storage(scale: torch.Tensor) -> torch.Tensor:
    """The scale as stored (fp16), rounded up so the grid still spans the group's range."""
    s16 = scale.to(STORAGE_DTYPE)
    up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
    return torch.where(s16.float() < scale, up, s16).float()


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w (rows, cols), scale/zero (rows,) or broadcastable -> integer codes (rows, cols) as float."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: str | None = None,
                 weights: torch.Tensor | None = None):
    """w (out, in) float -> (q (out, in) codes, scale (out, n_groups), zero (out, n_groups)).

    Groups are consecutive runs of `group_size` input columns (0: one group per row, i.e. per
    channel); when group_size does not divide `in`, the last group is shorter (576 columns at
    group 128 = 4 groups of 128 + 1 of 64). clip, weights (in,): see quant_grid.
    """
    out_f, in_f = w.shape
    group_size = group_size or in_f
    q = torch.empty_like(w)
    scales, zeros = [], []
    for start in range(0, in_f, group_size):
        block = w[:, start:start + group_size]
        cols = None if weights is None else weights[start:start + group_size]
        scale, zero = quant_grid(block, bits, symmetric, clip, cols)
        q[:, start:start + group_size] = quantize_to_grid(block, scale[:, None], zero[:, None], bits)
        scales.append(scale)
        zeros.append(zero)
    return q, torch.stack(scales, 1), torch.stack(zeros, 1)


def quant_linear_from_codes(linear, q, scale, zero, bits, group_size, symmetric) -> QuantLinear:
    """Pack integer codes into a QuantLinear (shared by RTN and GPTQ)."""
    zero_packed = None if symmetric else pack_bits(zero.to(torch.uint8), bits)
    return QuantLinear(linear.in_features, linear.out_features, bits, group_size or linear.in_features, symmetric,
                       pack_bits(q.to(torch.uint8), bits), scale, zero_packed, linear.bias)


def quant_storage(bits: int, group_size: int, symmetric: bool, out_f: int, in_f: int) -> tuple[int, int]:
    """(bytes, params) of a QuantLinear: packed b-bit codes, an fp16 scale per (row, group), packed
    b-bit zero points when asymmetric. group_size 0: one group per row (per channel)."""
    groups = math.ceil(in_f / (group_size or in_f))
    nbytes = math.ceil(out_f * in_f * bits / 8) + out_f * groups * 2
    if not symmetric:
        nbytes += math.ceil(out_f * groups * bits / 8)
    return nbytes, out_f * in_f


QUANT_MENU = tuple({"bits": b, "group_size": 128} for b in (2, 3, 4, 8))


def fix_gguf_grid(config) -> None:
    """__post_init__ of a config with a `gguf` option: `gguf=q4_k` fixes bits, group_size (the
    type's sub-block) and symmetric; a conflicting explicit value is refused, not overridden."""
    if config.gguf is None:
        return
    from llmpress.methods.ggml_grid import ggml_type
    t = ggml_type(config.gguf)
    implied = {"gguf": t.name.lower(), "bits": t.bits, "group_size": t.sub, "symmetric": t.symmetric}
    fields = type(config).__dataclass_fields__
    for name, value in implied.items():
        given = getattr(config, name)
        if name != "gguf" and given not in (value, fields[name].default):
            raise LLMPressError(f"gguf={t.name.lower()} fixes {name}={value}; got {name}={given!r}")
        object.__setattr__(config, name, value)


def check_gguf_clip(config) -> None:
    if config.gguf and config.clip and config.gguf.startswith("iq"):
        raise LLMPressError(f"gguf={config.gguf} always fits its scales by its own importance-weighted search "
                            f"(as llama.cpp does); clip={config.clip} does not apply, leave it unset")


def gguf_shape_problem(config, in_features: int) -> str | None:
    if config.gguf is None:
        return None
    from llmpress.methods.ggml_grid import ggml_type, shape_problem
    return shape_problem(ggml_type(config.gguf), in_features)


def gguf_storage(config, out_features: int, in_features: int) -> tuple[int, int]:
    from llmpress.methods.ggml_grid import ggml_type, row_bytes
    return out_features * row_bytes(ggml_type(config.gguf), in_features), out_features * in_features


def ggml_linear_from_codes(linear, gguf: str, codes: torch.Tensor | None, parts: dict):
    """Codes (out, in) on a GGUF grid fitted by ggml_grid.fit -> a GGMLLinear holding its bytes
    (codebook types: codes None, parts = ggml_codebook.encode's idx / signs / d / ls)."""
    from llmpress.methods.ggml_grid import encode, ggml_type
    from llmpress.modules import GGMLLinear
    t = ggml_type(gguf)
    return GGMLLinear(linear.in_features, linear.out_features, t.name, encode(t, codes, parts), linear.bias)


def rtn_gguf(w: torch.Tensor, gguf: str, clip: str | None = None, weights: torch.Tensor | None = None):
    """w (out, in) -> (codes (out, in), parts): round to nearest on a GGUF block grid."""
    from llmpress.methods.ggml_grid import ggml_type, round_to_grid
    codes, _, parts = round_to_grid(w, ggml_type(gguf), clip, weights)
    return codes, parts


def check_quant_options(bits: int, group_size: int, clip: str | None = None, symmetric: bool | None = None) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise LLMPressError(f"bits must be an integer in 2..8, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 0:
        raise LLMPressError(f"group_size must be a positive integer (or 0: per channel), got {group_size!r}")
    if clip not in (None, "mse", "search"):
        raise LLMPressError(f"clip must be 'mse' (search the clipping range per group), 'search' (llama.cpp's "
                            f"importance-weighted scale search, symmetric grids) or none, got {clip!r}")
    if clip == "search" and symmetric is False:
        raise LLMPressError("clip=search (llama.cpp's signed scale search) is built for symmetric grids; "
                            "use clip=mse for asymmetric ones")


@dataclass(frozen=True)
class RTN(MethodConfig):
    method = "rtn"
    family = "quantization"
    menu = QUANT_MENU
    bits: int = 4
    group_size: int = 128       # 0: per channel (one scale per output row)
    symmetric: bool = True
    clip: str | None = None     # "mse": search each group's clipping range (data-free: unweighted)
    # q4_1|q5_1|q2_k..q6_k|iq4_nl|iq4_xs|iq3_s|iq3_xxs|iq2_s|iq2_xs|iq2_xxs: quantize onto that llama.cpp grid
    # (fixes bits, group_size)
    gguf: str | None = None

    def __post_init__(self) -> None:
        fix_gguf_grid(self)
        super().__post_init__()

    def validate(self) -> None:
        check_quant_options(self.bits, self.group_size, self.clip, None if self.gguf else self.symmetric)
        check_gguf_clip(self)

    def shape_problem(self, out_features, in_features):
        return gguf_shape_problem(self, in_features)

    def rows_independent(self) -> bool:
        return True               # every scale and code is a function of its own row's weights

    def storage(self, out_features, in_features):
        if self.gguf:
            return gguf_storage(self, out_features, in_features)
        return quant_storage(self.bits, self.group_size, self.symmetric, out_features, in_features)


@register(RTN)
def apply_rtn(linear, config: RTN, stats):
    w = linear.weight.detach().float()
    if config.gguf:
        codes, parts = rtn_gguf(w, config.gguf, config.clip)
        return ggml_linear_from_codes(linear, config.gguf, codes, parts), {}
    q, scale, zero = rtn_quantize(w, config.bits, config.group_size, config.symmetric, config.clip)
    return quant_linear_from_codes(linear, q, scale, zero, config.bits, config.group_size, config.symmetric), {}
