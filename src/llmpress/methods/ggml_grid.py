"""llama.cpp's block grids (GGML types) as quantization targets: fit, encode, decode.

So that a GGUF export holds exactly llmpress's weights, RTN / GPTQ can quantize ON these grids
(`gptq:gguf=q4_k`); the layer then stores the GGML bytes themselves (modules.GGMLLinear) and the
export copies them. Every grid is w = q * s + o per sub-block, with q in 0..2**bits - 1:

| type | bits/weight | sub-block | s, o per sub-block |
|------|-------------|-----------|--------------------|
| Q4_1 | 5.0  | 32  | s = d, o = m (fp16 each) |
| Q5_1 | 6.0  | 32  | s = d, o = m (fp16 each) |
| Q4_K | 4.5  | 32 of a 256 super-block | s = d * sc, o = -dmin * mc; d, dmin fp16 per 256, sc, mc 6-bit |
| Q5_K | 5.5  | 32 of 256 | as Q4_K, 5-bit codes |
| Q6_K | 6.5625 | 16 of 256 | s = d * sc, o = -32 s; d fp16 per 256, sc int8 |
| Q3_K | 3.4375 | 16 of 256 | s = d * sc, o = -4 s; d fp16 per 256, sc 6-bit signed (stored + 32) |
| Q2_K | 2.625  | 16 of 256 | s = d * sc, o = -dmin * mc; d, dmin fp16 per 256, sc, mc 4-bit |

The non-uniform IQ4 grids (I. Kawrakow, llama.cpp PRs #5590 IQ4_NL and #5747 IQ4_XS, 2024) store
w = s * KVALUES[q] instead, a fixed 16-value table, with o = 0:

| IQ4_NL | 4.5  | 32      | s = d (fp16) |
| IQ4_XS | 4.25 | 32 of 256 | s = d * (l - 32); d fp16 per 256, l 6-bit |

Their scales are fitted by llama.cpp's importance-weighted search (quantize_row_iq4_nl_impl):
16 candidate inverse scales mapping the sub-block's signed peak near either end of the table,
each scored by its weighted least-squares fit (`fit_table_scales`).

The two-level K-quant scales (I. Kawrakow, "k-quants", llama.cpp PR #1684, 2023) are fitted as
llama.cpp does in spirit: each sub-block's float range first (min-max, or the clip search of
llmpress.methods.rtn), then the super-block scale d = max s / 63 (or 127) in fp16 and each
sub-block's 6-bit (8-bit) multiple of it. Byte layouts follow ggml-quants.c; `decode` reproduces
`gguf.quants.dequantize` bit for bit (tests/test_gguf_grids.py checks it for every type).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.errors import LLMPressError
from llmpress.methods.rtn import search_clip, search_scale, search_scale_min

F16 = torch.float16


@dataclass(frozen=True)
class GGMLType:
    name: str          # as gguf.GGMLQuantizationType spells it
    bits: int          # code bits
    block: int         # weights per block (a row must be a whole number of blocks)
    sub: int           # weights per sub-block (one s, o each)
    nbytes: int        # bytes per block
    symmetric: bool
    scale_levels: int = 0   # K-quants: the largest multiple of d a sub-block scale (and min) is stored as
    levels: tuple[int, ...] | None = None   # non-uniform grids: w = s * levels[q] (IQ4_NL, IQ4_XS)


# the IQ4 table (kvalues_iq4nl in ggml-common.h): a 4-bit code's value before the block scale
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


TYPES = {t.name.lower(): t for t in (
    GGMLType("Q4_1", 4, 32, 32, 20, False),
    GGMLType("Q5_1", 5, 32, 32, 24, False),
    GGMLType("Q4_K", 4, 256, 32, 144, False, 63),
    GGMLType("Q5_K", 5, 256, 32, 176, False, 63),
    GGMLType("Q6_K", 6, 256, 16, 210, True, 127),
    GGMLType("Q3_K", 3, 256, 16, 110, True, 31),
    GGMLType("Q2_K", 2, 256, 16, 84, False, 15),
    GGMLType("IQ4_NL", 4, 32, 32, 18, True, 0, KVALUES),
    GGMLType("IQ4_XS", 4, 256, 32, 136, True, 31, KVALUES),      # l - 32 in -32..31
)}


def ggml_type(name: str):
    """The GGMLType of a block grid, or the ggml_codebook.CodebookType of a codebook (IQ2 / IQ3) type."""
    from llmpress.methods import ggml_codebook
    t = TYPES.get(str(name).lower()) or ggml_codebook.TYPES.get(str(name).lower())
    if t is None:
        raise LLMPressError(f"unknown GGUF grid {name!r}; llmpress quantizes onto {', '.join([*TYPES, *ggml_codebook.TYPES])} "
                            "(Q4_0 / Q5_0 / Q8_0 are the symmetric group-32 grids: bits=4|5|8, group_size=32)")
    return t


def is_codebook(t) -> bool:
    from llmpress.methods.ggml_codebook import CodebookType
    return isinstance(t, CodebookType)


def shape_problem(t, in_features: int) -> str | None:          # GGMLType or CodebookType
    if in_features % t.block:
        return (f"GGUF {t.name} needs rows of whole {t.block}-weight blocks, this layer has {in_features} "
                "inputs (llama.cpp falls back to another type for such tensors too: --gguf-fallback llama.cpp does the same)")
    return None


def check_shape(t, in_features: int) -> None:          # GGMLType or CodebookType
    problem = shape_problem(t, in_features)
    if problem:
        raise LLMPressError(problem)


def row_bytes(t, in_features: int) -> int:          # GGMLType or CodebookType
    return in_features // t.block * t.nbytes


# ---------------------------------------------------------------------------------------------
# fitting: w (rows, cols) -> scale, offset (rows, cols / sub) float32 and the stored pieces

def fit(w: torch.Tensor, t: GGMLType, clip: str | None = None, weights: torch.Tensor | None = None):
    """w (rows, cols) float32 -> (scale (rows, S), offset (rows, S), parts) with S = cols / t.sub:
    each sub-block's grid is w = q * scale + offset, exactly as the GGML type stores it (parts:
    the fields `encode` writes). clip="mse": each sub-block's float range is shrunk by the factor of
    rtn.CLIP_SHRINKS (rtn.search_clip) with the smallest (weights-weighted, (cols,)) squared rounding error, before
    the second-level rounding of the K-quant scales. clip="search": llama.cpp's importance-weighted
    searches per sub-block instead (rtn.search_scale, signed scales, for Q3_K / Q6_K, the peak one
    stored as sc = -32 / -128 as llama.cpp does; rtn.search_scale_min, scale and min, for the others)."""
    rows, cols = w.shape
    check_shape(t, cols)
    if t.levels is not None:
        return _fit_table(w, t, weights)
    ws = w.reshape(rows, cols // t.sub, t.sub)                              # (rows, S, sub)
    wt = None if weights is None else weights.reshape(cols // t.sub, t.sub)
    s, lo = _sub_ranges(ws, t, clip, wt)                                   # float (rows, S)
    if t.name in ("Q4_1", "Q5_1"):
        d = s.to(F16)
        d = torch.where(d > 0, d, torch.ones_like(d))    # a constant sub-block: every code 0 -> m
        m = lo.to(F16)
        return d.float(), m.float(), {"d": d, "m": m}
    per = t.block // t.sub                                                 # sub-blocks per super-block
    s = s.reshape(rows, -1, per)
    levels = t.scale_levels
    if t.symmetric and clip == "search":     # signed sub-block scales: the peak one stored as -(levels + 1)
        d, sc, scale = _signed_multiples(s, levels)
        return scale, -(2 ** (t.bits - 1)) * scale, {"d": d, "sc": sc}
    d = (s.amax(-1) / levels).to(F16)                                      # (rows, B)
    sc = _small_multiple(s, d, levels, at_least=1)
    scale = (d.float()[..., None] * sc.float()).reshape(rows, -1)          # exact in fp32, as ggml computes it
    if t.symmetric:                                          # Q6_K / Q3_K: w = d sc (q - 2**(bits - 1))
        return scale, -(2 ** (t.bits - 1)) * scale, {"d": d, "sc": sc}
    mins = (-lo).reshape(rows, -1, per)                                    # >= 0
    dmin = (mins.amax(-1) / levels).to(F16)
    mc = _small_multiple(mins, dmin, levels, at_least=0)
    offset = -(dmin.float()[..., None] * mc.float()).reshape(rows, -1)
    return scale, offset, {"d": d, "dmin": dmin, "sc": sc, "mc": mc}


def _fit_table(w: torch.Tensor, t: GGMLType, weights: torch.Tensor | None):
    """IQ4_NL / IQ4_XS: the float sub-block scales of fit_table_scales, then as stored: IQ4_NL d =
    fp16(s); IQ4_XS d = fp16(-s_peak / 32) per super-block (s_peak: the sub-block scale of largest
    magnitude, so it is stored as l - 32 = -32 exactly) and each sub-block's nearest multiple
    l - 32 in -32..31 of it. Returns (scale (rows, S), zeros, parts) like fit."""
    rows, cols = w.shape
    s = fit_table_scales(w, t, weights)                                    # (rows, S) float32
    if t.block == t.sub:
        d = s.to(F16)
        return d.float(), torch.zeros_like(s), {"d": d}
    d, sc, scale = _signed_multiples(s.reshape(rows, -1, t.block // t.sub), t.scale_levels)   # (rows, B, 8)
    return scale, torch.zeros_like(scale), {"d": d, "sc": sc}


def _signed_multiples(s: torch.Tensor, levels: int):
    """Signed sub-block scales s (rows, B, per) -> (d (rows, B) fp16, sc (rows, B, per) int8 in
    -(levels + 1)..levels, scale = d * sc (rows, B * per), exact in fp32 as ggml computes it):
    d = -s_peak / (levels + 1), so the sub-block scale of largest magnitude is stored at the
    bottom of the range exactly, as llama.cpp does (Q3_K, Q6_K with search; IQ4_XS); 0 where d = 0."""
    peak = s.gather(-1, s.abs().argmax(-1, keepdim=True))[..., 0]          # (rows, B) signed
    d = (-peak / (levels + 1)).to(F16)
    df = d.float()[..., None]
    sc = torch.round(s / torch.where(df != 0, df, torch.ones_like(df))).clamp(-(levels + 1), levels)
    sc = torch.where(df != 0, sc, torch.zeros_like(sc))
    return d, sc.to(torch.int8), (df * sc).reshape(s.shape[0], -1)


def fit_table_scales(w: torch.Tensor, t: GGMLType, weights: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's IQ4 scale search (quantize_row_iq4_nl_impl, ntry = 7): w (rows, cols) float32,
    weights (cols,) the importance of each column (a Hessian diagonal, i.e. llama.cpp's imatrix
    x n; None: data-free) -> the float scale of each sub-block (rows, cols / sub).

    Each weight counts importance * sqrt(sigma2 + w^2) (sigma2 = 2 sum w^2 / 256 over its
    super-block, or over the block for IQ4_NL), or w^2 without importance, as llama.cpp weighs
    them. Candidate inverse scales map the signed peak to +127 or to -(127 - k), k = -7..7; codes
    round to the nearest table value and the scale is the weighted least-squares fit
    sum(w x v) / sum(w v^2); the best fit (largest sum(w x v)^2 / sum(w v^2)) is kept. Scales can
    be negative (the peak then uses the table's -127 end)."""
    rows, cols = w.shape
    table = torch.tensor(t.levels, dtype=torch.float32, device=w.device)
    ws = w.reshape(rows, cols // t.sub, t.sub)                             # (rows, S, sub)
    per = t.block // t.sub
    if weights is None:
        imp = ws * ws
    else:
        sup = w.reshape(rows, -1, t.block)
        sigma2 = (2 / t.block) * (sup * sup).sum(-1, keepdim=True)         # (rows, B, 1)
        sigma2 = sigma2.repeat_interleave(per, 1)                           # (rows, S, 1)
        imp = weights.reshape(1, -1, t.sub) * torch.sqrt(sigma2 + ws * ws)
    peak = ws.gather(-1, ws.abs().argmax(-1, keepdim=True))                 # (rows, S, 1) signed
    safe = torch.where(peak != 0, peak, torch.ones_like(peak))
    best_score = torch.full_like(peak[..., 0], -1.0)
    best = torch.zeros_like(peak[..., 0])
    for inverse in [-t.levels[0]] + [k + t.levels[0] for k in range(-7, 8)]:
        v = table[nearest_level(inverse / safe * ws, table)]
        sumvx, sumv2 = (imp * v * ws).sum(-1), (imp * v * v).sum(-1)
        score = torch.where(sumv2 > 0, sumvx * sumvx / sumv2.clamp(min=1e-30), torch.zeros_like(sumvx))
        better = score > best_score
        best = torch.where(better, sumvx / sumv2.clamp(min=1e-30), best)
        best_score = torch.where(better, score, best_score)
    return torch.where(peak[..., 0] != 0, best, torch.zeros_like(best))


def nearest_level(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the ascending table (L,) for every x (int64, x's shape)."""
    return torch.bucketize(x, (table[1:] + table[:-1]) / 2)


def _small_multiple(x: torch.Tensor, d: torch.Tensor, levels: int, at_least: int) -> torch.Tensor:
    """x (rows, B, per) >= 0, d (rows, B) fp16 -> round(x / d) in at_least..levels (uint8); 0 where d = 0."""
    df = d.float()[..., None]
    k = torch.round(x / torch.where(df > 0, df, torch.ones_like(df))).clamp(at_least, levels)
    return torch.where(df > 0, k, torch.zeros_like(k)).to(torch.uint8)


def _sub_ranges(ws: torch.Tensor, t: GGMLType, clip: str | None, wt: torch.Tensor | None):
    """ws (rows, S, sub) -> (step s, low end lo) per sub-block as floats: asymmetric grids span
    [lo, lo + qmax s] (K-quants with lo <= 0, their min being stored as -dmin mc); Q6_K spans
    s * [-32, 31] with s = 2 absmax / 63 (the symmetric convention of rtn)."""
    qmax = 2 ** t.bits - 1

    def ranges(shrink: float):
        if t.symmetric:
            s = ws.abs().amax(-1) * shrink * 2 / qmax
            return s, -(2 ** (t.bits - 1)) * s
        lo, hi = ws.amin(-1), ws.amax(-1)
        if t.block > t.sub:                     # K-quants: the stored min is -dmin mc <= 0
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        mid = (lo + hi) / 2 if t.block == t.sub else torch.zeros_like(lo)
        lo, hi = mid + (lo - mid) * shrink, mid + (hi - mid) * shrink
        return (hi - lo) / qmax, lo

    if clip is None:
        return ranges(1.0)
    if clip == "search":                     # llama.cpp's importance-weighted searches, per sub-block
        rows, n_sub, sub = ws.shape
        flat = ws.reshape(-1, sub)
        wflat = None if wt is None else wt[None].expand(rows, n_sub, sub).reshape(-1, sub)
        if t.symmetric:                      # make_qx_quants: signed scale, all 2**b levels
            s, _ = search_scale(flat, t.bits, wflat, round_scale=False)
            s = s.reshape(rows, n_sub)
            return s, -(2 ** (t.bits - 1)) * s
        s, lo = search_scale_min(flat, t.bits, wflat, nonpositive=t.block > t.sub)       # make_qkx2_quants
        return s.reshape(rows, n_sub).clamp(min=0), lo.reshape(rows, n_sub)

    def error(s, lo):                                                        # (rows, S)
        d = ws - (quantize(ws, s[..., None], lo[..., None], t.bits) * s[..., None] + lo[..., None])
        return (d * d * wt).sum(-1) if wt is not None else (d * d).sum(-1)

    return search_clip(clip, ranges, error)


def round_to_grid(w: torch.Tensor, t: GGMLType, clip: str | None = None, weights: torch.Tensor | None = None):
    """Round to nearest: w (rows, cols) -> (codes (rows, cols), dequantized (rows, cols), parts);
    the dequantized weights are q * scale + offset, the very float32 operations `decode` makes.
    Codebook types (ggml_codebook.round_to_grid): codes None, the parts hold the codewords."""
    rows, cols = w.shape
    if is_codebook(t):
        from llmpress.methods import ggml_codebook
        if clip:
            raise LLMPressError(f"GGUF {t.name} fits its scales by its own search; clip does not apply")
        deq, parts = ggml_codebook.round_to_grid(w, t, weights)
        return None, deq, parts
    scale, offset, parts = fit(w, t, clip, weights)
    q = quantize(w.view(rows, -1, t.sub), scale[..., None], offset[..., None], t.bits, t.levels)
    return q.view(rows, cols), values(q, scale[..., None], offset[..., None], t.levels).view(rows, cols), parts


def quantize(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
             levels: tuple[int, ...] | None = None) -> torch.Tensor:
    """Codes (as float) of w on the grid w = q * scale + offset, or w = scale * levels[q] for a
    table grid (broadcast; table scales may be negative); 0 where scale is 0."""
    if levels is not None:
        table = torch.tensor(levels, dtype=torch.float32, device=w.device)
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        q = nearest_level(w / safe, table).float()
        return torch.where(scale != 0, q, torch.zeros_like(q))
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))        # signed scales: the grid reversed
    q = torch.clamp(torch.round((w - offset) / safe), 0, 2 ** bits - 1)
    return torch.where(scale != 0, q, torch.zeros_like(q))


def values(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: tuple[int, ...] | None = None):
    """The weights of codes q on their grid (broadcast): q * scale + offset, or scale * levels[q]
    (one float32 rounding either way, the one ggml makes)."""
    if levels is None:
        return q * scale + offset
    table = torch.tensor(levels, dtype=torch.float32, device=q.device)
    return scale * table[q.long()]


# ---------------------------------------------------------------------------------------------
# bytes: encode codes + parts -> (rows, row_bytes) uint8; decode -> float32, as gguf-py does

def _f16_bytes(x: torch.Tensor) -> torch.Tensor:          # (rows, B) fp16 -> (rows, B, 2) uint8
    return x.to(F16).contiguous().view(torch.uint8).view(*x.shape, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (..., 2n) codes -> (..., n) bytes: value j in the low nibble of byte j, value n + j in its
    high nibble (the layout of every GGML 4-bit field)."""
    n = q.shape[-1] // 2
    return (q[..., :n] & 0x0F) | ((q[..., n:] & 0x0F) << 4)


def _unnibble(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b & 0x0F, b >> 4], -1)


def _crumbs(x: torch.Tensor) -> torch.Tensor:
    """x (rows, nb, 2, 4, 32) 2-bit values -> (rows, nb, 2, 32) bytes: value k of byte l at bits 2k
    (the 2-bit fields of Q2_K / Q3_K `qs` and Q6_K `qh`)."""
    return x[:, :, :, 0] | (x[:, :, :, 1] << 2) | (x[:, :, :, 2] << 4) | (x[:, :, :, 3] << 6)


def _uncrumbs(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([(b >> (2 * k)) & 0x03 for k in range(4)], -2)


def _bit_planes(bits: torch.Tensor, nbytes: int) -> torch.Tensor:
    """bits (..., 8 * nbytes) in {0, 1} -> (..., nbytes) bytes, bit j of the stream at byte j // 8, bit j % 8."""
    b = bits.to(torch.int32).reshape(*bits.shape[:-1], nbytes, 8)
    return (b << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def _unbit_planes(b: torch.Tensor) -> torch.Tensor:
    return ((b[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(*b.shape[:-1], -1)


def _pack_scales_k(sc: torch.Tensor, mc: torch.Tensor) -> torch.Tensor:
    """6-bit sc, mc (rows, B, 8) -> the 12 bytes of ggml's get_scale_min_k4 layout (rows, B, 12)."""
    sc, mc = sc.to(torch.int32), mc.to(torch.int32)
    b0 = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    b1 = mc[..., :4] | ((mc[..., 4:] >> 4) << 6)
    b2 = (sc[..., 4:] & 0x0F) | ((mc[..., 4:] & 0x0F) << 4)
    return torch.cat([b0, b1, b2], -1).to(torch.uint8)


def _unpack_scales_k(b: torch.Tensor):
    b = b.to(torch.int32)
    b0, b1, b2 = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([b0 & 63, (b2 & 0x0F) | ((b0 >> 6) << 4)], -1)
    mc = torch.cat([b1 & 63, (b2 >> 4) | ((b1 >> 6) << 4)], -1)
    return sc, mc


def encode(t: GGMLType, codes: torch.Tensor, parts: dict) -> torch.Tensor:
    """codes (rows, cols) in 0..2**bits - 1 and fit's parts -> GGML bytes (rows, cols / block * nbytes).
    Codebook types: codes None, parts = ggml_codebook.encode's arguments."""
    if is_codebook(t):
        from llmpress.methods import ggml_codebook
        return ggml_codebook.encode(t, **parts)
    rows, cols = codes.shape
    nb = cols // t.block
    q = codes.to(torch.int32).reshape(rows, nb, t.block)
    if t.name == "IQ4_NL":
        fields = [_f16_bytes(parts["d"]), _nibbles(q)]
    elif t.name == "IQ4_XS":     # l + 32 (6 bits): low nibble in scales_l[ib / 2] at 4 (ib % 2), top 2 bits at scales_h 2 ib
        u = parts["sc"].reshape(rows, nb, 8).to(torch.int32) + 32
        high = ((u >> 4) << (2 * torch.arange(8, dtype=torch.int32))).sum(-1)          # (rows, nb) uint16
        scales_h = torch.stack([high & 0xFF, high >> 8], -1)
        low = u & 0x0F
        fields = [_f16_bytes(parts["d"]), scales_h, low[..., 0::2] | (low[..., 1::2] << 4),
                  _nibbles(q.view(rows, nb, 8, 32)).reshape(rows, nb, 128)]
    elif t.name in ("Q4_1", "Q5_1"):
        fields = [_f16_bytes(parts["d"]), _f16_bytes(parts["m"])]
        if t.bits == 5:          # fifth bits as a little-endian uint32 per block, bit j = weight j
            fields.append(_bit_planes(q >> 4, 4))
        fields.append(_nibbles(q))
    elif t.name in ("Q4_K", "Q5_K"):
        scales = _pack_scales_k(parts["sc"].reshape(rows, nb, 8), parts["mc"].reshape(rows, nb, 8))
        fields = [_f16_bytes(parts["d"]), _f16_bytes(parts["dmin"]), scales]
        if t.bits == 5:          # qh[l] bit j = fifth bit of weight 32 j + l
            fields.append(_bit_planes((q >> 4).view(rows, nb, 8, 32).transpose(-1, -2).reshape(rows, nb, 256), 32))
        # qs: chunk k (64 weights) -> 32 bytes, weights 64k + l low, 64k + 32 + l high
        fields.append(_nibbles(q.view(rows, nb, 4, 64)).reshape(rows, nb, 128))
    elif t.name in ("Q2_K", "Q3_K"):   # weight e = 128 h + 32 k + l: 2 low bits at qs[32 h + l] bits 2k
        qq = q.view(rows, nb, 2, 4, 32)                                     # (h, k, l)
        qs = _crumbs(qq & 0x03).reshape(rows, nb, 64)
        if t.name == "Q2_K":     # scales byte j: sc (low nibble), mc (high nibble) of 16-weight sub-block j
            scales = parts["sc"].reshape(rows, nb, 16).to(torch.int32) | (parts["mc"].reshape(rows, nb, 16).to(torch.int32) << 4)
            fields = [scales, qs, _f16_bytes(parts["d"]), _f16_bytes(parts["dmin"])]
        else:                    # Q3_K: hmask[l] bit 4 h + k = the third bit; 6-bit scales sc + 32
            hi = ((qq >> 2) & 1).permute(0, 1, 4, 2, 3).reshape(rows, nb, 32, 8)      # (l, 4 h + k)
            hmask = (hi << torch.arange(8, dtype=torch.int32)).sum(-1)
            u = (parts["sc"].reshape(rows, nb, 16).to(torch.int32) + 32)                # 0..63
            low4 = u & 0x0F
            b_low = low4[..., 0:8] | (low4[..., 8:16] << 4)                             # bytes 0..7
            h2 = (u >> 4).view(rows, nb, 4, 4)                                          # (j // 4, j % 4)
            b_high = h2[:, :, 0] | (h2[:, :, 1] << 2) | (h2[:, :, 2] << 4) | (h2[:, :, 3] << 6)   # bytes 8..11
            fields = [hmask, qs, b_low, b_high, _f16_bytes(parts["d"])]
    else:                        # Q6_K: weight e = 128 h + 32 k + l
        qq = q.view(rows, nb, 2, 4, 32)                                     # (h, k, l)
        low = qq & 0x0F
        ql = (low[:, :, :, 0:2] | (low[:, :, :, 2:4] << 4)).reshape(rows, nb, 128)   # byte 64h + 32(k%2) + l, nibble k//2
        hi = (qq >> 4) & 0x03
        qh = _crumbs(hi)
        sc = parts["sc"].reshape(rows, nb, 16).to(torch.int8).view(torch.uint8)
        fields = [ql, qh.reshape(rows, nb, 64), sc, _f16_bytes(parts["d"])]
    return torch.cat([f.to(torch.uint8) for f in fields], -1).reshape(rows, -1)


def decode_parts(t: GGMLType, raw: torch.Tensor, cols: int):
    """GGML bytes (rows, row_bytes) uint8 -> (codes (rows, S, sub) float32, scale (rows, S),
    offset (rows, S)) with S = cols / t.sub: the grid w = q * scale + offset of every sub-block."""
    rows = raw.shape[0]
    nb = cols // t.block
    b = raw.reshape(rows, nb, t.nbytes)

    def f16(x):
        return x.contiguous().view(F16).float()                              # (rows, nb, 1)

    if t.name == "IQ4_NL":
        q, scale, offset = _unnibble(b[..., 2:18]), f16(b[..., 0:2]), torch.zeros(rows, nb, 1)
    elif t.name == "IQ4_XS":
        high = b[..., 2].to(torch.int32) | (b[..., 3].to(torch.int32) << 8)                 # (rows, nb)
        ib = torch.arange(8)
        low = (b[..., 4:8].to(torch.int32)[..., ib // 2] >> (4 * (ib % 2))) & 0x0F             # (rows, nb, 8)
        l = (low | (((high[..., None] >> (2 * ib)) & 3) << 4)) - 32
        scale = f16(b[..., 0:2]) * l.float()                                                   # (rows, nb, 8)
        q, offset = _unnibble(b[..., 8:136].reshape(rows, nb, 8, 16)), torch.zeros_like(scale)
    elif t.name in ("Q4_1", "Q5_1"):
        d, m = f16(b[..., 0:2]), f16(b[..., 2:4])
        q = _unnibble(b[..., -16:])
        if t.bits == 5:
            q = q | (_unbit_planes(b[..., 4:8]) << 4)
        scale, offset = d, m
    elif t.name in ("Q4_K", "Q5_K"):
        d, dmin = f16(b[..., 0:2]), f16(b[..., 2:4])
        sc, mc = _unpack_scales_k(b[..., 4:16])                               # (rows, nb, 8)
        qs = b[..., -128:].reshape(rows, nb, 4, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], -1).reshape(rows, nb, 8, 32)     # chunk k: sub-blocks 2k, 2k + 1
        if t.bits == 5:
            q = q | (_unbit_planes(b[..., 16:48]).reshape(rows, nb, 32, 8).transpose(-1, -2) << 4)
        scale, offset = d * sc.float(), -(dmin * mc.float())
    elif t.name in ("Q2_K", "Q3_K"):                                          # weight 128 h + 32 k + l
        qs = b[..., 16:80] if t.name == "Q2_K" else b[..., 32:96]
        q = _uncrumbs(qs.reshape(rows, nb, 2, 32))                                       # (rows, nb, 2, 4, 32)
        if t.name == "Q2_K":
            sb = b[..., 0:16]
            d, dmin = f16(b[..., 80:82]), f16(b[..., 82:84])
            scale, offset = d * (sb & 0x0F).float(), -(dmin * (sb >> 4).float())
        else:
            hm = b[..., 0:32].to(torch.int32)                                    # (rows, nb, 32): byte l
            hbit = (hm[..., None] >> torch.arange(8, dtype=torch.int32)) & 1     # (rows, nb, l, 4 h + k)
            q = q | (hbit.view(rows, nb, 32, 2, 4).permute(0, 1, 3, 4, 2) << 2).to(q.dtype)
            sc = b[..., 96:108].to(torch.int32)
            j = torch.arange(16)
            low4 = (sc[..., j % 8] >> (4 * (j // 8))) & 0x0F
            high2 = (sc[..., 8 + j % 4] >> (2 * (j // 4))) & 0x03
            scale = f16(b[..., 108:110]) * ((low4 | (high2 << 4)) - 32).float()  # (rows, nb, 16)
            offset = -4 * scale              # q s - 4 s == (q - 4) s exactly: every product fits in fp32
    else:                                                                     # Q6_K: weight 128 h + 32 k + l
        ql, qh = b[..., 0:128].reshape(rows, nb, 2, 64), b[..., 128:192].reshape(rows, nb, 2, 32)
        low = torch.stack([ql[..., 0:32] & 0x0F, ql[..., 32:64] & 0x0F, ql[..., 0:32] >> 4, ql[..., 32:64] >> 4], 3)
        high = _uncrumbs(qh)                                                  # (rows, nb, 2, 4, 32)
        q = low | (high << 4)
        scale = f16(b[..., 208:210]) * b[..., 192:208].contiguous().view(torch.int8).float()   # (rows, nb, 16)
        offset = -32 * scale                 # q s - 32 s == (q - 32) s exactly: every product fits in fp32
    return q.reshape(rows, -1, t.sub).float(), scale.reshape(rows, -1), offset.reshape(rows, -1)


def decode(t: GGMLType, raw: torch.Tensor, cols: int) -> torch.Tensor:
    """GGML bytes (rows, row_bytes) uint8 -> weights (rows, cols) float32, bit-identical to
    gguf.quants.dequantize: q * s is exact in float32 for every type, and the one rounding (+ o)
    is the one ggml makes. Codebook types: ggml_codebook.decode."""
    if is_codebook(t):
        from llmpress.methods import ggml_codebook
        return ggml_codebook.decode(t, raw, cols)
    q, scale, offset = decode_parts(t, raw, cols)
    return values(q, scale[..., None], offset[..., None], t.levels).reshape(raw.shape[0], cols)
