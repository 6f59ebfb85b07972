"""Vector quantization: each run of `dim` consecutive weights of a row is one code into a codebook of
2^(bits*dim) vectors shared by a block of rows, each row with its own fp16 scale; codes chosen with
GPTQ's error feedback.

GPTVQ (van Baalen, Kuzmin, Nagel et al. 2024, "GPTVQ: The Blessing of Dimensionality for LLM
Quantization", arXiv:2402.15319): quantizing vectors instead of scalars lets the grid follow the
joint distribution of neighbouring weights (its cells need not form a product grid), and a fractional
number of bits per weight is a whole number of bits per vector (2.5 bits = a 5-bit code per pair).
Steps:
1. rows are divided by their scale (RMS) so that rows of different size share a codebook; each
   block of `rows` rows gets a codebook from a k-means (k-means++ seeded) of its normalized vectors,
   each coordinate weighted by its Hessian diagonal h_jj (as GPTVQ's EM initialisation);
2. codes are chosen vector by vector (vectors in order of decreasing h, act-order) by GPTQ's sweep:
   the vector of columns S is given the codeword minimizing (w_S - c)^T [(H^-1)_SS]^-1 (w_S - c),
   the exact loss increase of fixing S while the later columns absorb the error (as GPTVQ does),
   and that error is spread over the later columns through the inverse Hessian's Cholesky factor;
3. with the codes fixed the row scales (closed form) and then the codebooks (conjugate gradients on
   the exact quadratic ||(W - S C[codes]) X||^2) are re-fitted, each kept only if the layer's
   output error falls (GPTVQ updates its codebooks by gradient descent on the same loss).

Cost: bits per weight plus, per block of rows, 2^(bits*dim) x dim fp16 values, and one fp16 scale
per row (3 bits, dim 2, 256 rows on 576 inputs: 3 + 0.014 + 0.028 = 3.04 bits per weight; a
per-row 3-bit table, gptq-lut, costs 3.22 there). On the rotated embedded model (with the online
Hadamards) 3-bit pairs give WikiText-2 perplexity 30.3 at 3.04 bits per weight, against 34.6 for
asymmetric per-channel 3-bit GPTQ (3.03) and 31.1 for 3-bit tables (3.19); on the allocator's menu
they take 3.0 bits per weight from 30.8 to 27.9 (bench/low_bits.py, bench/README.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.methods import hessian
from llmpress.methods.hessian import check_damp
from llmpress.modules import STORAGE_DTYPE, VQLinear, pack_bits


def vector_order(h: torch.Tensor, dim: int) -> torch.Tensor:
    """h (in, in) -> column permutation (in,) that keeps each vector's `dim` columns together and
    visits vectors by decreasing sum of their h_jj (act-order over vectors)."""
    in_f = h.shape[0]
    importance = torch.diagonal(h).reshape(in_f // dim, dim).sum(1)
    order = torch.argsort(importance, descending=True)
    return (order[:, None] * dim + torch.arange(dim, device=h.device)).reshape(-1)


def kmeans(points: torch.Tensor, weights: torch.Tensor, k: int, iters: int, generator: torch.Generator,
           sample: int | None = None) -> torch.Tensor:
    """points (N, d), weights (N, d) >= 0 per coordinate -> (k, d) centroids of the weighted k-means
    sum_n sum_d weights[n, d] (points[n, d] - c[a(n), d])^2 (a(n): the centroid of point n), on a
    seeded subset of `sample` points if given: k-means++ seeding from `generator`, then Lloyd's
    iterations (a centroid's coordinate = the weighted mean of its points'; an empty cluster
    keeps its centroid)."""
    if sample is not None and points.shape[0] > sample:      # a seeded subset: Lloyd's cost is N x k per step
        keep = torch.randperm(points.shape[0], generator=generator)[:sample]
        points, weights = points[keep], weights[keep]
    n = points.shape[0]
    if n <= k:                       # every vector its own codeword (exact), the rest repeats
        return points[torch.arange(k, device=points.device) % n].clone()
    first = torch.randint(n, (1,), generator=generator).item()
    cent = points[first:first + 1].clone()
    best = ((points - cent) ** 2 * weights).sum(1)                         # (N,) distance to the nearest so far
    for _ in range(1, k):
        pick = torch.multinomial(best.double() + 1e-30, 1, generator=generator).item()
        cent = torch.cat([cent, points[pick:pick + 1]])
        best = torch.minimum(best, ((points - points[pick]) ** 2 * weights).sum(1))
    for _ in range(iters):
        idx = assign(points, weights, cent)
        num = torch.zeros_like(cent).index_add_(0, idx, points * weights)
        den = torch.zeros_like(cent).index_add_(0, idx, weights)
        new = torch.where(den > 0, num / den.clamp(min=1e-30), cent)
        if torch.equal(new, cent):
            break
        cent = new
    return cent


def assign(points: torch.Tensor, weights: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """(N, d), (N, d), (k, d) -> (N,) index of each point's nearest centroid in the weighted metric:
    sum_d w_d (x_d - c_d)^2 = const - 2 (w x) . c + w . c^2, two (N, d) x (d, k) products."""
    return (weights @ (cent * cent).T - 2 * (points * weights) @ cent.T).argmin(1)


def fit_codebooks(wn: torch.Tensor, hdiag: torch.Tensor, dim: int, k: int, rows: int, iters: int = 20,
                  seed: int = 0) -> torch.Tensor:
    """wn (out, in) normalized rows, hdiag (in,) -> (ceil(out / rows), k, dim) codebooks: one weighted
    k-means per block of `rows` rows over (a seeded sample of 512 k of) its vectors of `dim`
    consecutive columns (all vectors: 3-4x the time for errors within 1 %, on the embedded model)."""
    out_f, in_f = wn.shape
    gen = torch.Generator().manual_seed(seed)
    wt = hdiag.float().clamp(min=0).view(1, in_f // dim, dim)
    books = []
    for r0 in range(0, out_f, rows):
        block = wn[r0:r0 + rows].float().reshape(-1, in_f // dim, dim)         # (R, in/dim, dim)
        books.append(kmeans(block.reshape(-1, dim), wt.expand_as(block).reshape(-1, dim), k, iters, gen, 512 * k))
    return torch.stack(books)


def gptq_vq(w: torch.Tensor, h: torch.Tensor, books: torch.Tensor, rows: int, dim: int,
            act_order: bool = True, damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """w (out, in) (normalized rows), h (in, in), books (B, k, dim) -> (codes (out, in / dim) int64, info):
    step 2 of the module docstring. Falls back to the nearest codeword in the h_jj-weighted metric
    (info says so) when H cannot be inverted."""
    out_f, in_f = w.shape
    w, h, _ = hessian.prepare(w, h)
    book_of_row = torch.arange(out_f, device=w.device) // rows
    perm = vector_order(h, dim) if act_order else torch.arange(in_f, device=w.device)
    upper, used = hessian.inverse_cholesky(h[perm][:, perm], damp)
    if upper is None:
        pts = w.reshape(out_f, -1, dim)
        wt = torch.diagonal(h).float().view(1, -1, dim).expand_as(pts)
        codes = torch.stack([assign(pts[r], wt[r], books[book_of_row[r]]) for r in range(out_f)])
        return codes, {"fallback": "nearest", "reason": "Cholesky failed at every damping"}
    w = w[:, perm]
    vec_perm = perm.view(-1, dim)[:, 0] // dim                                 # vector visited k-th
    codes = torch.empty(out_f, in_f // dim, dtype=torch.long, device=w.device)

    def pick(w1, i, col, u):
        lower = torch.linalg.inv(u).T                                          # (dim, dim) = U_SS^-T
        y = w1[:, i:i + dim] @ lower.T                                         # (out, dim) in the loss metric
        z = books @ lower.T                                                    # (B, k, dim)
        c = (y[:, None, :] - z[book_of_row]).square().sum(-1).argmin(1)        # (out,) nearest there
        codes[:, col // dim] = c
        return books[book_of_row, c]                                           # (out, dim)

    hessian.gptq_sweep(w, upper, pick, step=dim, block=128 - 128 % dim)
    out = torch.empty_like(codes)
    out[:, vec_perm] = codes                                                   # back to the original vector order
    return out, {"damp": used}


def decode(codes: torch.Tensor, books: torch.Tensor, rows: int) -> torch.Tensor:
    """codes (out, in / dim), books (B, k, dim) -> (out, in) normalized weights."""
    book_of_row = torch.arange(codes.shape[0], device=codes.device) // rows
    return books[book_of_row[:, None], codes].reshape(codes.shape[0], -1)


def layer_error(w: torch.Tensor, h: torch.Tensor, deq: torch.Tensor) -> float:
    """tr((deq - w) H (deq - w)^T): float32 products (they only compare candidates), a float64 sum."""
    d = (deq - w).float()
    return ((d @ h.float()) * d).double().sum().item()


def refit_scales(w: torch.Tensor, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """w, q (out, in) -> (out,) scales s minimizing each row's (w - s q) H (w - s q)^T."""
    qh = (q.float() @ h.float()).double()
    num = (qh * w.double()).sum(1)
    den = (qh * q.double()).sum(1)
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.ones_like(den)).float()


def refit_codebooks(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, books: torch.Tensor,
                    scale: torch.Tensor, rows: int, steps: int = 5) -> torch.Tensor:
    """The codebooks minimizing tr((W - S Q(C)) H (W - S Q(C))^T) for fixed codes and scales S,
    by `steps` conjugate-gradient iterations on that quadratic (exact operator, never formed: one
    (out, in) x (in, in) float32 product per step), from `books`. The caller keeps the result only
    if it lowers the error (5 steps reach within 0.01 % of 20's decrease on the embedded model)."""
    out_f = w.shape[0]
    h = h.float()
    s = scale.float()[:, None]
    b, k, dim = books.shape
    flat = (torch.arange(out_f, device=w.device) // rows)[:, None] * k + codes     # (out, in/dim) codeword id

    def expand(c):                       # (B, k, dim) -> (out, in) S Q(c)
        return s * c.reshape(b * k, dim)[flat].reshape(out_f, -1)

    def gather(g):                       # (out, in) -> (B, k, dim): the adjoint of expand
        g = (s * g).reshape(out_f, -1, dim)
        return torch.zeros(b * k, dim, dtype=g.dtype, device=g.device).index_add_(
            0, flat.reshape(-1), g.reshape(-1, dim)).reshape(b, k, dim)

    c = books.float()
    r = gather((w.float() - expand(c)) @ h)                  # minus half the gradient
    p, rr = r.clone(), (r * r).sum()
    for _ in range(steps):
        if rr.item() <= 1e-30:
            break
        ap = gather(expand(p) @ h)
        alpha = rr / (p * ap).sum().clamp(min=1e-30)
        c = c + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    return c.float()


def vq_quantize(w: torch.Tensor, h: torch.Tensor, bits: float, dim: int = 2, rows: int = 256,
                act_order: bool = True, damp: float = 0.01, iters: int = 20, refit: bool = True,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """w (out, in), h (in, in) -> (codes (out, in / dim) int64, codebooks (B, 2^(bits*dim), dim) fp16,
    scales (out,) fp16, info): steps 1-3 of the module docstring, with every stored number rounded
    to fp16 before the errors that decide what is kept are measured."""
    k = 2 ** round(bits * dim)
    w = w.float()
    scale = w.square().mean(1).sqrt().clamp(min=1e-8)                           # (out,) row RMS
    wn = w / scale[:, None]
    books = fit_codebooks(wn, torch.diagonal(h), dim, k, rows, iters, seed).to(STORAGE_DTYPE).float()
    codes, info = gptq_vq(wn, h, books, rows, dim, act_order, damp)
    scale = scale.to(STORAGE_DTYPE).float()

    def err(bk, sc):
        return layer_error(w, h, decode(codes, bk, rows) * sc[:, None])

    first = best = err(books, scale)
    if refit:
        for _ in range(2):                                   # scales, then codebooks, twice
            new_scale = refit_scales(w, h, decode(codes, books, rows)).to(STORAGE_DTYPE).float()
            if (e := err(books, new_scale)) < best:
                scale, best = new_scale, e
            new_books = refit_codebooks(w, h, codes, books, scale, rows).to(STORAGE_DTYPE).float()
            if (e := err(new_books, scale)) < best:
                books, best = new_books, e
        info["refit_error_ratio"] = round(best / first, 6) if first > 0 else 1.0
    return codes, books.to(STORAGE_DTYPE), scale.to(STORAGE_DTYPE), info


@dataclass(frozen=True)
class GPTQVQ(MethodConfig):
    """Vectors of `dim` weights coded with bits * dim bits each into codebooks shared by `rows` rows
    (an fp16 scale per row), solved with GPTQ's error feedback (GPTVQ)."""
    method = "gptq-vq"
    family = "quantization"
    stat = "hessian"
    menu = tuple({"bits": b} for b in (2, 2.5, 3, 3.5))
    bits: float = 3
    dim: int = 2
    rows: int = 256          # rows sharing one codebook (the last block may be shorter)
    act_order: bool = True
    damp: float = 0.01
    iters: int = 20          # Lloyd iterations for the initial codebooks
    refit: bool = True       # re-fit scales and codebooks to the chosen codes
    seed: int = 0            # k-means++ seeding

    @property
    def code_bits(self) -> int:
        return round(self.bits * self.dim)

    def validate(self) -> None:
        if not isinstance(self.dim, int) or not 1 <= self.dim <= 8:
            raise LLMPressError(f"gptq-vq dim (weights per vector) must be an integer in 1..8, got {self.dim!r}")
        if not isinstance(self.bits, (int, float)) or abs(self.bits * self.dim - self.code_bits) > 1e-9 \
                or not 1 <= self.code_bits <= 8:
            raise LLMPressError(f"gptq-vq bits * dim must be a whole number of bits per code in 1..8 "
                                f"(dim {self.dim}: bits in steps of 1/{self.dim}), got bits={self.bits!r}")
        if not isinstance(self.rows, int) or self.rows < 1:
            raise LLMPressError(f"rows (rows sharing a codebook) must be an integer >= 1, got {self.rows!r}")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise LLMPressError(f"iters must be an integer >= 0, got {self.iters!r}")
        check_damp(self.damp)

    def shape_problem(self, out_features, in_features):
        if in_features % self.dim:
            return f"gptq-vq dim={self.dim} does not divide the {in_features} input features"
        return None

    def storage(self, out_features, in_features):
        codes = math.ceil(out_features * in_features // self.dim * self.code_bits / 8)
        books = math.ceil(out_features / self.rows) * 2 ** self.code_bits * self.dim * 2
        return codes + books + out_features * 2, out_features * in_features


@register(GPTQVQ)
def apply_gptq_vq(linear, config: GPTQVQ, stats):
    codes, books, scale, info = vq_quantize(linear.weight.detach(), stats.hessian(), config.bits, config.dim,
                                            config.rows, config.act_order, config.damp, config.iters,
                                            config.refit, config.seed)
    module = VQLinear(linear.in_features, linear.out_features, config.dim, config.rows,
                      pack_bits(codes, config.code_bits), books, scale, linear.bias)
    return module.to(linear.weight.device), info
