"""llama.cpp's codebook ("i-quant") types as quantization targets: nearest codeword, fit, encode, decode.

The i-quants of I. Kawrakow (llama.cpp PRs #4773 IQ2_XXS, #4856 IQ2_XS, #5711 IQ2_S, #5196 IQ3_XXS,
#5676 IQ3_S) store each group of `dim` weights as an index into a fixed lattice codebook of
magnitudes g >= 1 (grid values as gguf-py holds them), times signs, times a sub-block scale:
w = dl * grid[idx][k] * sign[k], with dl from one fp16 d per 256-weight super-block and a 4-bit ls
per sub-block:

| type    | bytes/256 | sub | dim | entries | grid values    | signs                      | dl                  |
|---------|-----------|-----|-----|---------|----------------|----------------------------|---------------------|
| IQ2_XXS | 66  | 32 | 8 | 256  | 8, 25, 43      | 7 bits per 8, even parity | d * (0.5 + ls) * 0.25 |
| IQ2_XS  | 74  | 16 | 8 | 512  | 8, 25, 43      | 7 bits per 8, even parity | d * (0.5 + ls) * 0.25 |
| IQ2_S   | 82  | 16 | 8 | 1024 | 8, 25, 43      | 8 free bits per 8         | d * (0.5 + ls) * 0.25 |
| IQ3_XXS | 98  | 32 | 4 | 256  | 4, 12, ..., 62 | 7 bits per 8, even parity | d * (0.5 + ls) * 0.5  |
| IQ3_S   | 110 | 32 | 4 | 512  | 1, 3, ..., 15  | 8 free bits per 8         | d * (1 + 2 ls)        |

No codeword is zero and dl > 0 whenever d > 0, so only a whole super-block (d = 0) decodes to zeros.
The parity types store 7 sign bits per 8 weights; the 8th is implied (ksigns) by an even number of
negatives. Byte layouts follow ggml-quants.c / gguf-py; `decode` reproduces
`gguf.quants.dequantize` bit for bit (tests/test_gguf_codebook.py checks every type). The fit is
the data-free analogue of llama.cpp's quantize_row_iq*_impl: a scale search per sub-block with the
(exact, joint codeword + parity flip) weighted nearest codeword, weighted least-squares scales,
then the two-level (fp16 d, 4-bit ls) rounding and a last code choice for the stored dl.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.errors import LLMPressError
from llmpress.methods.ggml_grid import check_shape, row_bytes, shape_problem  # noqa: F401  (shared by both families)

F16 = torch.float16


@dataclass(frozen=True)
class CodebookType:
    name: str          # as gguf.GGMLQuantizationType spells it
    sub: int           # weights per sub-block (one 4-bit ls each)
    dim: int           # weights per codeword
    entries: int       # codebook size
    nbytes: int        # bytes per 256-weight super-block
    free_signs: bool   # False: 7 stored sign bits per 8 weights, even parity of negatives
    block: int = 256
    scale_bits: int = 4

    # what a config's bits / group_size / symmetric read for this type (fix_gguf_grid); no level table
    symmetric = True
    levels = None

    @property
    def bits(self) -> int:           # nominal: IQ2_* ~2.1-2.5, IQ3_* ~3.1-3.4 bits per weight
        return int(self.name[2])


TYPES = {t.name.lower(): t for t in (
    CodebookType("IQ2_XXS", 32, 8, 256, 66, False),
    CodebookType("IQ2_XS", 16, 8, 512, 74, False),
    CodebookType("IQ2_S", 16, 8, 1024, 82, True),
    CodebookType("IQ3_XXS", 32, 4, 256, 98, False),
    CodebookType("IQ3_S", 32, 4, 512, 110, True),
)}

# dl = d * unit * (offset + ls): (unit, offset) per family; exact in fp32, see sub_scale
_SCALE = {"IQ2_XXS": (0.25, 0.5), "IQ2_XS": (0.25, 0.5), "IQ2_S": (0.25, 0.5),
          "IQ3_XXS": (0.5, 0.5), "IQ3_S": (2.0, 0.5)}
_GRIDS: dict[str, torch.Tensor] = {}
_CHUNK_FLOATS = 64 * 2 ** 20                 # ~256 MB of float32 per nearest() chunk
SCALE_FACTORS = [0.7 + 0.6 * i / 14 for i in range(15)]   # max|x| / dl tried, in units of max(grid)


def codebook_type(name: str) -> CodebookType:
    t = TYPES.get(str(name).lower())
    if t is None:
        raise LLMPressError(f"unknown GGUF codebook type {name!r}; llmpress quantizes onto {', '.join(TYPES)}")
    return t


def codebook(t: CodebookType) -> torch.Tensor:
    """The magnitudes (entries, dim) float32 of gguf-py's grid for t (before signs)."""
    if t.name not in _GRIDS:
        import gguf
        cls = getattr(gguf.quants, t.name)
        cls.init_grid()
        _GRIDS[t.name] = torch.from_numpy(cls.grid.reshape(t.entries, t.dim).copy())
    return _GRIDS[t.name]


def _ksigns() -> torch.Tensor:
    """(128,) int64: the 8 sign bits (1 = negative) whose low 7 bits are the index."""
    if "ksigns" not in _GRIDS:
        import gguf
        _GRIDS["ksigns"] = torch.frombuffer(bytearray(gguf.quants.IQ2_XXS.ksigns), dtype=torch.uint8).long()
    return _GRIDS["ksigns"]


def sub_scale(t: CodebookType, d: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """d (rows, nb) fp16, ls (rows, S) ints -> dl (rows, S) float32, the float32 operations (and
    order) of gguf-py: IQ2_*: d * (0.5 + ls) * 0.25, IQ3_XXS: ... * 0.5, IQ3_S: d * (1 + 2 ls)."""
    df = d.float().repeat_interleave(t.block // t.sub, -1)
    if t.name == "IQ3_S":
        return df * (1 + 2 * ls.long()).float()
    return df * (0.5 + ls.float()) * _SCALE[t.name][0]


def _dequant(t: CodebookType, idx: torch.Tensor, signs: torch.Tensor, dl: torch.Tensor) -> torch.Tensor:
    """idx (rows, G), signs (rows, cols), dl (rows, S) -> (dl * grid) * sign (rows, cols), as gguf-py."""
    rows, cols = signs.shape
    g = codebook(t).to(dl.device)[idx.long()].reshape(rows, cols // t.sub, t.sub)
    return (dl[..., None] * g * signs.reshape(rows, -1, t.sub)).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# nearest codeword (and signs) of targets already divided by their dl

def nearest(t: CodebookType, x: torch.Tensor, weights: torch.Tensor | None = None):
    """x (n, dim) float, weights (n, dim) >= 0 or None -> (idx (n,) int64, signs (n, dim) float32 +-1)
    minimizing sum weights (x - signs * grid[idx])^2 over the type's valid codes: signs = sign(x);
    for the parity types, each 8-weight sign group (1 row for dim 8; rows 2j, 2j + 1 for IQ3_XXS,
    so n must be even) with an odd number of negatives gets the one flip (cost 4 w_k |x_k| g_k) and
    the codewords that are best jointly. Costs via matmuls: exact up to fp32 rounding of near-ties."""
    g = codebook(t).to(x.device)                                       # (E, dim)
    x = x.float()
    a, neg = x.abs(), x < 0
    w = torch.ones_like(a) if weights is None else weights.float().expand_as(a)
    n, m = x.shape[0], 1 if t.free_signs else 8 // t.dim               # m: codewords per sign group
    if n % m:
        raise LLMPressError(f"GGUF {t.name}: sign groups of 8 weights need an even number of {t.dim}-codewords")
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    flip = torch.full((n,), -1, dtype=torch.long, device=x.device)    # element to flip, -1: none
    odd_all = torch.zeros_like(neg[:, 0]) if t.free_signs else \
        (neg.reshape(-1, 8).sum(-1) % 2 == 1).repeat_interleave(m)    # (n,): row in an odd group
    g2t, gt, wa_all = (g * g).T, g.T, w * a
    step = max(m, _CHUNK_FLOATS // (t.entries * t.dim) // m * m)
    for lo in range(0, n, step):
        wc, wa, odd = w[lo:lo + step], wa_all[lo:lo + step], odd_all[lo:lo + step]
        cost = wc @ g2t - 2 * (wa @ gt)                                # (c, E): error - sum w x^2
        val, best = cost.min(-1)
        rows = odd.nonzero().squeeze(1)                                # whole groups, in order
        if len(rows):
            extra, k = (wa[rows, None, :] * g).min(-1)                 # (r, E): cheapest flip per codeword
            fval, fbest = (cost[rows] + 4 * extra).min(-1)
            j = (fval - val[rows]).view(-1, m).argmin(-1) + torch.arange(0, len(rows), m, device=x.device)
            best[rows[j]] = fbest[j]                                   # the group's member that flips
            flip[lo + rows[j]] = k[j, fbest[j]]
        idx[lo:lo + step] = best
    signs = torch.where(neg, -1.0, 1.0)
    hit = flip >= 0
    signs[hit, flip[hit]] *= -1
    return idx, signs


# ---------------------------------------------------------------------------------------------
# fitting: w (rows, cols) -> dequantized weights and the stored pieces

def round_to_grid(w: torch.Tensor, t: CodebookType, weights: torch.Tensor | None = None):
    """Importance-weighted round to nearest: w (rows, cols), weights (cols,) >= 0 or None ->
    (dequantized (rows, cols) float32, parts {idx, signs, d, ls} for `encode`). The dequantized
    weights are those `decode(encode(**parts))` gives, the very same float32 operations."""
    rows, cols = w.shape
    check_shape(t, cols)
    S, per = cols // t.sub, t.block // t.sub
    x = w.float().reshape(rows, S, t.sub)
    if weights is not None and tuple(weights.shape) != (cols,):
        raise LLMPressError(f"GGUF {t.name}: importance weights of shape {tuple(weights.shape)}, want ({cols},)")
    wt = (torch.ones(cols, device=w.device) if weights is None else weights.float().to(w.device))
    wt = wt.reshape(S, t.sub).expand(rows, S, t.sub).contiguous()
    wg = wt.view(-1, t.dim)
    g = codebook(t).to(w.device)

    def codes(dl):                       # dl (rows, S) -> idx (rows, G), signs, signed grid values
        safe = torch.where(dl > 0, dl, torch.ones_like(dl))[..., None]
        idx, sg = nearest(t, (x / safe).reshape(-1, t.dim), wg)
        return idx.view(rows, -1), sg.view(rows, cols), (g[idx] * sg).view(rows, S, t.sub)

    # 1. per sub-block float scale: candidates around max|x| / max(grid), least-squares refit
    amax = x.abs().amax(-1)                                                # (rows, S)
    xx = (wt * x * x).sum(-1)
    best_err, dl = torch.full_like(amax, float("inf")), torch.zeros_like(amax)
    for f in SCALE_FACTORS:
        s = amax / (float(g.max()) * f)
        q = codes(s)[2]
        sqx, sqq = (wt * x * q).sum(-1), (wt * q * q).sum(-1)
        scale = torch.where(sqq > 0, sqx / sqq.clamp_min(1e-30), s).clamp_min(0)
        err = xx - 2 * scale * sqx + scale * scale * sqq
        better = err < best_err
        best_err, dl = torch.where(better, err, best_err), torch.where(better, scale, dl)
    dl = torch.where(amax > 0, dl, torch.zeros_like(dl))

    # 2. super-block d = largest dl / the largest multiple ls = 15 expresses; ls floor or ceil
    unit, off = _SCALE[t.name]
    top = unit * (off + 2 ** t.scale_bits - 1)
    d = (dl.view(rows, -1, per).amax(-1) / top).clamp(max=65504.0).to(F16)   # (rows, nb)
    dd = d.float().repeat_interleave(per, -1)
    c = dl / (unit * torch.where(dd > 0, dd, torch.ones_like(dd))) - off      # continuous ls
    cands = []
    for ls in (c.floor(), c.floor() + 1):
        ls = ls.clamp(0, 2 ** t.scale_bits - 1).long()
        sdl = sub_scale(t, d, ls)                                             # exact stored dl
        idx, sg, q = codes(sdl)
        cands.append(((wt * (x - sdl[..., None] * q) ** 2).sum(-1), (idx, sg, ls)))
    (e0, p0), (e1, p1) = cands
    up = e1 < e0                                                              # (rows, S): ceil wins
    idx, sg, ls = (torch.where(up.repeat_interleave(r, -1), b, a) for a, b, r in zip(p0, p1, (t.sub // t.dim, t.sub, 1)))
    return _dequant(t, idx, sg, sub_scale(t, d, ls)), {"idx": idx, "signs": sg, "d": d, "ls": ls}


# ---------------------------------------------------------------------------------------------
# bytes: encode parts -> (rows, row_bytes) uint8; decode -> float32, as gguf-py does

def _le_bytes(x: torch.Tensor, n: int) -> torch.Tensor:     # ints (...) -> (..., n) little-endian bytes
    return torch.stack([(x >> (8 * i)) & 0xFF for i in range(n)], -1)


def _le(b: torch.Tensor) -> torch.Tensor:                    # (..., n) bytes -> ints (...) int64
    return sum(b[..., i].long() << (8 * i) for i in range(b.shape[-1]))


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:          # (..., 8) {0,1} -> (...) byte, bit k = item k
    return (bits.long() << torch.arange(8, device=bits.device)).sum(-1)


def _unpack_bits(b: torch.Tensor, n: int = 8) -> torch.Tensor:   # (...) -> (..., n) bits, LSB first
    return (b.long()[..., None] >> torch.arange(n, device=b.device)) & 1


def _nib_bytes(ls: torch.Tensor) -> torch.Tensor:           # (..., 2n) -> (..., n): byte j = ls[2j] | ls[2j+1] << 4
    return ls[..., 0::2] | (ls[..., 1::2] << 4)


def _unnib(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b & 0x0F, b >> 4], -1).flatten(-2)


def _sign_aux(s7: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """s7 (..., 4) 7-bit sign indices, ls (...) -> the uint32 (...) of IQ2_XXS / IQ3_XXS: 7 j, ls << 28."""
    return (s7 << (7 * torch.arange(4, device=s7.device))).sum(-1) | (ls << 28)


def encode(t: CodebookType, idx: torch.Tensor, signs: torch.Tensor, d: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """idx (rows, cols / dim) in 0..entries-1, signs (rows, cols) +-1, d (rows, nb) fp16,
    ls (rows, cols / sub) in 0..15 -> GGML bytes (rows, nb * nbytes) uint8."""
    rows, cols = signs.shape
    check_shape(t, cols)
    nb = cols // t.block
    idx, ls = idx.long().reshape(rows, nb, -1), ls.long().reshape(rows, nb, -1)
    if idx.shape[-1] != t.block // t.dim or ls.shape[-1] != t.block // t.sub or d.shape != (rows, nb):
        raise LLMPressError(f"GGUF {t.name}: idx / ls / d shapes {tuple(idx.shape)} / {tuple(ls.shape)} / "
                            f"{tuple(d.shape)} do not fit {rows} x {cols} weights")
    if idx.min() < 0 or idx.max() >= t.entries or ls.min() < 0 or ls.max() >= 2 ** t.scale_bits:
        raise LLMPressError(f"GGUF {t.name}: codeword index outside 0..{t.entries - 1} or scale outside "
                            f"0..{2 ** t.scale_bits - 1}")
    neg = (signs < 0).long().reshape(rows, nb, 32, 8)                     # 8-weight sign groups
    if not t.free_signs:
        odd = int((neg.sum(-1) % 2).sum())
        if odd:
            raise LLMPressError(f"GGUF {t.name} stores 7 sign bits per 8 weights (even number of "
                                f"negatives); {odd} groups of 8 have an odd number")
        s7 = (neg[..., :7] << torch.arange(7, device=neg.device)).sum(-1)   # (rows, nb, 32)
    fields = [d.to(F16).contiguous().view(torch.uint8).view(rows, nb, 2).long()]
    if t.name == "IQ2_XXS":      # per sub-block: 4 index bytes, then uint32 signs | ls << 28
        aux = _le_bytes(_sign_aux(s7.view(rows, nb, 8, 4), ls), 4)
        fields.append(torch.cat([idx.view(rows, nb, 8, 4), aux], -1).view(rows, nb, 64))
    elif t.name == "IQ3_XXS":    # 64 index bytes, then per sub-block uint32 signs | ls << 28
        fields += [idx, _le_bytes(_sign_aux(s7.view(rows, nb, 8, 4), ls), 4).view(rows, nb, 32)]
    elif t.name == "IQ2_XS":     # uint16 per codeword: 9-bit index | 7 sign bits << 9; nibble scales
        fields += [_le_bytes(idx | (s7 << 9), 2).view(rows, nb, 64), _nib_bytes(ls)]
    elif t.name == "IQ2_S":      # low index bytes, sign bytes, qh: bits 8..9 of index 4j + i at 2i
        qh = ((idx >> 8).view(rows, nb, 8, 4) << (2 * torch.arange(4, device=idx.device))).sum(-1)
        fields += [idx & 0xFF, _pack_bits(neg), qh, _nib_bytes(ls)]
    else:                        # IQ3_S: low index bytes, qh: bit 8 of index 8j + i at bit i, signs
        fields += [idx & 0xFF, _pack_bits((idx >> 8).view(rows, nb, 8, 8)), _pack_bits(neg), _nib_bytes(ls)]
    return torch.cat(fields, -1).to(torch.uint8).reshape(rows, -1)


def decode_parts(t: CodebookType, raw: torch.Tensor, cols: int):
    """GGML bytes (rows, row_bytes) uint8 -> (idx (rows, cols / dim) int64, signs (rows, cols)
    float32 +-1, d (rows, nb) fp16, ls (rows, cols / sub) int64)."""
    rows = raw.shape[0]
    nb = cols // t.block
    b = raw.reshape(rows, nb, t.nbytes)
    d = b[..., 0:2].contiguous().view(F16).view(rows, nb)
    if t.name in ("IQ2_XXS", "IQ3_XXS"):
        if t.name == "IQ2_XXS":
            q = b[..., 2:].reshape(rows, nb, 8, 8)
            idx, aux = q[..., :4].long(), _le(q[..., 4:])                  # (rows, nb, 8, 4), (rows, nb, 8)
        else:
            idx, aux = b[..., 2:66].long(), _le(b[..., 66:98].reshape(rows, nb, 8, 4))
        s7 = (aux[..., None] >> (7 * torch.arange(4, device=raw.device))) & 0x7F
        ls = aux >> 28
    elif t.name == "IQ2_XS":
        q = _le(b[..., 2:66].reshape(rows, nb, 32, 2))
        idx, s7, ls = q & 511, q >> 9, _unnib(b[..., 66:74])
    elif t.name == "IQ2_S":
        qh = _unpack_bits(b[..., 66:74]).view(rows, nb, 8, 4, 2)           # 2 bits per codeword
        idx = b[..., 2:34].long() | (((qh[..., 0] | (qh[..., 1] << 1)).reshape(rows, nb, 32)) << 8)
        neg, ls = _unpack_bits(b[..., 34:66]), _unnib(b[..., 74:82])
    else:
        idx = b[..., 2:66].long() | (_unpack_bits(b[..., 66:74]).reshape(rows, nb, 64) << 8)
        neg, ls = _unpack_bits(b[..., 74:106]), _unnib(b[..., 106:110])
    if not t.free_signs:
        neg = _unpack_bits(_ksigns().to(raw.device)[s7.reshape(rows, nb, 32)])
    signs = torch.where(neg.reshape(rows, cols) > 0, -1.0, 1.0)
    return idx.reshape(rows, -1), signs, d, ls.long().reshape(rows, -1)


def decode(t: CodebookType, raw: torch.Tensor, cols: int) -> torch.Tensor:
    """GGML bytes (rows, row_bytes) uint8 -> weights (rows, cols) float32, bit-identical to
    gguf.quants.dequantize: the same dl, then (dl * grid) * sign in float32."""
    idx, signs, d, ls = decode_parts(t, raw, cols)
    return _dequant(t, idx, signs, sub_scale(t, d, ls))
