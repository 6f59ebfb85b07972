"""GPTQ: Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (arXiv:2210.17323).

Columns are quantized left to right; each column's rounding error is spread over the columns not yet
quantized through the inverse Hessian H^-1 of the layer's inputs (H = X^T X / n), which minimizes
||W X - Q X||^2 greedily. Updates are applied lazily in blocks of columns (Algorithm 1).

refine=k then runs k sweeps of cyclic coordinate descent on the same objective and grid, starting
from GPTQ's codes (QuantEase: Behdin, Acharya, Gupta, Song, Hsu, Keerthi & Mazumder 2023, "QuantEase:
Optimization-based Quantization for Language Models", arXiv:2309.01885): each column in turn is
set to the grid point nearest its best value given all the others, which can only lower the error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.methods import ggml_grid, hessian
from llmpress.methods.hessian import check_damp
from llmpress.methods.rtn import (QUANT_MENU, check_gguf_clip, check_quant_options, fix_gguf_grid, ggml_linear_from_codes, gguf_shape_problem,
                                  gguf_storage, quant_grid, quant_linear_from_codes, quant_storage, quantize_to_grid,
                                  rtn_quantize)


def gptq_solve(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool,
               act_order: bool = False, damp: float = 0.01, clip: str | None = None,
               grid: tuple[torch.Tensor, torch.Tensor] | None = None, refine: int = 0,
               fixed: tuple[torch.Tensor, torch.Tensor] | None = None, levels: tuple[int, ...] | None = None):
    """w (out, in), h (in, in) -> (codes (out, in), scale (out, G), zero (out, G), info).

    Groups are runs of `group_size` input columns in the original order (the last may be shorter;
    0: one group per row). Without act_order a group's grid is fitted when the sweep reaches it (on
    the error-updated weights); with act_order (columns visited by decreasing h_jj) or a single
    group, grids are fitted up front from the original weights ("static groups"), so the stored
    layout needs no permutation index. clip="mse": each grid's clipping range is searched for the
    smallest rounding error weighted by h_jj (quant_grid).
    grid=(scale, offset) (out, G): a fixed grid w = q * scale + offset per (row, group), fitted by
    the caller (a GGUF block type, llmpress.methods.ggml_grid), returned in place of (scale, zero);
    with levels (a table of 2**bits values, IQ4_NL / IQ4_XS) the grid is w = scale * levels[q].
    refine: coordinate-descent sweeps after the GPTQ pass (QuantEase), on the damped Hessian.
    fixed=(scale, zero) (out, G): a uniform grid given by the caller (refit_scales), not fitted.
    If the damped Hessian cannot be inverted even at DAMP_STEPS x damp, falls back to RTN (info says so).
    """
    out_f, in_f = w.shape
    group_size = group_size or in_f
    w, h, dead = hessian.prepare(w, h)
    w_target, h_orig = w.clone(), h                    # original column order, for refine
    diag = torch.diagonal(h).float()
    n_groups = -(-in_f // group_size)
    static = act_order or n_groups == 1 or grid is not None or fixed is not None
    scale_t = torch.empty(n_groups, out_f, device=w.device)   # transposed: one contiguous row per group
    zero_t = torch.empty(n_groups, out_f, device=w.device)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(in_f, device=w.device)
    if grid is not None:                               # zero_t holds the offsets
        scale_t, zero_t = grid[0].T.contiguous(), grid[1].T.contiguous()
    if fixed is not None:
        scale_t, zero_t = fixed[0].T.contiguous().float(), fixed[1].T.contiguous().float()
    if static:
        for g in range(n_groups if grid is None and fixed is None else 0):
            cols = slice(g * group_size, (g + 1) * group_size)
            scale_t[g], zero_t[g] = quant_grid(w[:, cols], bits, symmetric, clip, diag[cols])
        w = w[:, perm]
        h = h[perm][:, perm]
    upper, used = hessian.inverse_cholesky(h, damp)
    if upper is None and grid is not None:
        q = ggml_grid.quantize(w[:, torch.argsort(perm)], grid[0].repeat_interleave(group_size, 1),
                               grid[1].repeat_interleave(group_size, 1), bits, levels)
        return q, grid[0], grid[1], {"fallback": "rtn", "reason": "Cholesky failed at every damping"}
    if upper is None:
        q, scale, zero = rtn_quantize(w[:, torch.argsort(perm)], bits, group_size, symmetric, clip, diag)
        return q, scale, zero, {"fallback": "rtn", "reason": "Cholesky failed at every damping"}
    group_of = (perm // group_size).tolist()          # group of each visited column
    codes = torch.zeros(out_f, in_f, device=w.device)

    def pick(w1, i, col, u):
        g = group_of[col]
        if not static and col % group_size == 0:      # a group's grid fitted when the sweep reaches it
            scale_t[g], zero_t[g] = quant_grid(w1[:, i:i + group_size], bits, symmetric, clip,
                                               diag[col:col + group_size])
        s, z = scale_t[g], zero_t[g]
        if grid is None:
            q = quantize_to_grid(w1[:, i], s, z, bits)
            deq = (q - z) * s
        else:                                         # z is the offset: w = q s + z (or s levels[q])
            q = ggml_grid.quantize(w1[:, i], s, z, bits, levels)
            deq = ggml_grid.values(q, s, z, levels)
        codes[:, col] = q
        return deq[:, None]

    # Block width: a multiple of group_size near 128, so a group never straddles two blocks.
    hessian.gptq_sweep(w, upper, pick, block=group_size * max(1, 128 // group_size) if not static else 128)
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    info = {"damp": used}
    if refine:
        h_damped = damped(h_orig, used)
        onto, back = ((lambda x, s, z: ggml_grid.quantize(x, s, z, bits, levels),
                       lambda q, s, z: ggml_grid.values(q, s, z, levels)) if grid is not None else
                      (lambda x, s, z: quantize_to_grid(x, s, z, bits), lambda q, s, z: (q - z) * s))
        expand = lambda t: t.T.repeat_interleave(group_size, 1)[:, :in_f]      # (G, out) -> (out, in)
        codes, info["refine"] = refine_codes(w_target, h_damped, codes, expand(scale_t), expand(zero_t), bits,
                                             refine, onto, back)
    if dead.any():
        info["dead_columns"] = int(dead.sum())
    return codes, scale_t.T.contiguous(), zero_t.T.contiguous(), info


def gptq_codebook_solve(w: torch.Tensor, h: torch.Tensor, t, act_order: bool = True, damp: float = 0.01):
    """GPTQ's sweep onto one of llama.cpp's codebook types (IQ2_XXS .. IQ3_S, llmpress.methods.ggml_codebook):
    w (out, in), h (in, in) -> (parts for ggml_codebook.encode, info).

    The two-level scales (fp16 d per 256 weights, 4-bit ls per sub-block) are fitted up front on the
    original weights by the Hessian-diagonal-weighted search (ggml_codebook.round_to_grid) and held
    fixed; the sweep then visits 8 columns at a time (one sign group: one 8-codeword or two
    4-codewords), in order of decreasing sum of h_jj when act_order (GPTVQ's vector act-order), and
    gives them the valid codeword(s) and signs nearest, in the diagonal of the exact loss metric
    [(H^-1)_SS]^-1 of those 8 columns, to their error-updated values divided by their sub-block scale
    (the sign parity of IQ2_XXS / IQ2_XS / IQ3_XXS is met exactly, ggml_codebook.nearest); the
    rounding error is spread over the later columns as GPTQ does. llama.cpp's quantizer makes the
    same weighted choice with no error feedback."""
    from llmpress.methods import ggml_codebook
    from llmpress.methods.vq import vector_order
    out_f, in_f = w.shape
    w, h, dead = hessian.prepare(w, h)
    _, parts = ggml_codebook.round_to_grid(w, t, torch.diagonal(h).float())
    dl = ggml_codebook.sub_scale(t, parts["d"], parts["ls"])                   # (out, in / sub) as stored
    step = 8
    perm = vector_order(h, step) if act_order else torch.arange(in_f, device=w.device)
    upper, used = hessian.inverse_cholesky(h[perm][:, perm], damp)
    if upper is None:
        return parts, {"fallback": "rtn", "reason": "Cholesky failed at every damping"}
    g = ggml_codebook.codebook(t).to(w.device)
    per = step // t.dim                                                         # codewords per step
    idx = parts["idx"].clone()                                                  # (out, in / dim)
    signs = parts["signs"].clone()                                              # (out, in)

    def pick(w1, i, col, u):
        j0 = perm[col].item()                                                   # first original column
        scale = dl[:, j0 // t.sub][:, None]                                     # (out, 1), > 0 where d > 0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        metric = torch.diagonal(torch.cholesky_inverse(u.T.double())).float()   # diag [(H^-1)_SS]^-1, (8,)
        x = (w1[:, i:i + step] / safe).reshape(-1, t.dim)
        k, sg = ggml_codebook.nearest(t, x, metric.view(per, t.dim).repeat(out_f, 1))
        k, sg = k.view(out_f, per), sg.view(out_f, step)
        idx[:, j0 // t.dim:j0 // t.dim + per] = k
        signs[:, j0:j0 + step] = sg
        return torch.where(scale > 0, scale * (g[k].reshape(out_f, step) * sg), torch.zeros_like(sg))

    hessian.gptq_sweep(w[:, perm], upper, pick, step=step, block=128)
    info = {"damp": used}
    if dead.any():
        info["dead_columns"] = int(dead.sum())
    return {**parts, "idx": idx, "signs": signs}, info


def damped(h: torch.Tensor, rel: float) -> torch.Tensor:
    """h + rel * mean(diag h) I in float32: the objective GPTQ minimizes at the damping it used."""
    return h.float() + rel * torch.diagonal(h).float().mean() * torch.eye(h.shape[0], device=h.device)


def refit_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 group_size: int, chunk: int = 256) -> torch.Tensor:
    """The scales that minimize the layer's output error tr((W' - W) H (W' - W)^T) for fixed codes,
    W'[r, j] = (q[r, j] - z[r, g]) s[r, g] (g: j's group): per row, the G x G linear system
    A s = b with A[g, g'] = sum_{j in g, k in g'} c_j H_jk c_k and b[g] = sum_{j in g} c_j (H w)_j,
    c = q - z. GPTQ fixes each group's scale before its sweep; this re-fits them all jointly to the
    codes the sweep chose (the closed-form scale step of GPTVQ / of llama.cpp's weighted
    least-squares scale, in the Hessian's metric rather than its diagonal). w (out, in) target,
    h (in, in) damped Hessian, codes (out, in), scale / zero (out, G) -> scale (out, G) rounded to
    fp16 as stored; groups whose codes are all at zero keep their scale. Rows in chunks (memory
    chunk x in x G)."""
    out_f, in_f = w.shape
    n_groups = scale.shape[1]
    pad = n_groups * group_size - in_f                       # a shorter last group: zero-padded columns
    group = torch.arange(in_f, device=w.device) // group_size                      # column -> group
    hp = torch.nn.functional.pad(h, (0, pad, 0, pad)).view(in_f + pad, n_groups, group_size)
    hw = torch.nn.functional.pad(w @ h, (0, pad)).view(out_f, n_groups, group_size)   # (out, G, gs) = H w_r
    new = torch.empty_like(scale)
    for r0 in range(0, out_f, chunk):
        rows = slice(r0, r0 + chunk)
        c = torch.nn.functional.pad(codes[rows].float() - zero[rows][:, group], (0, pad))
        c = c.view(-1, n_groups, group_size)                                        # (R, G, gs)
        y = torch.einsum("jgs,rgs->rjg", hp, c).reshape(-1, n_groups, group_size, n_groups)   # H (c . 1_g)
        a = torch.einsum("rfs,rfsg->rfg", c, y)                                     # (R, G, G)
        b = torch.einsum("rgs,rgs->rg", hw[rows], c)                                # (R, G)
        empty = torch.diagonal(a, dim1=1, dim2=2) <= 0                              # (R, G) no code off zero
        a = a + torch.diag_embed(empty.to(a.dtype))
        b = torch.where(empty, scale[rows], b)
        new[rows] = torch.linalg.solve(a.double(), b.double()[..., None])[..., 0].float()
    new = new.to(torch.float16).float()
    return torch.where(torch.isfinite(new) & (new != 0), new, scale)


def quant_error(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int) -> float:
    """tr((W' - W) H (W' - W)^T) of the uniform grid's weights W' = (q - z) s."""
    group = torch.arange(w.shape[1], device=w.device) // group_size
    d = (codes.float() - zero[:, group]) * scale[:, group] - w
    return ((d @ h) * d).sum().item()


def refine_codes(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, bits: int, sweeps: int, onto, back) -> tuple[torch.Tensor, dict]:
    """Cyclic coordinate descent on tr((W' - W) H (W' - W)^T) over the grid (QuantEase), all rows at once.

    w (out, in) target, h (in, in) damped Hessian, codes (out, in) start, scale / zero (out, in) the
    grid of each weight (zero: the offset for GGUF grids); onto(x, s, z) -> codes, back(q, s, z) ->
    values. Column j's best value given the others is W'_j - G_j / h_jj with G = (W' - W) H kept up
    to date by rank-1 updates; its nearest grid point minimizes the error in that column exactly, so
    no sweep raises the error. Stops early when a sweep moves no code. Returns (codes, info)."""
    codes = codes.clone()
    deq = back(codes, scale, zero)                       # (out, in)
    g = (deq - w) @ h                                     # (out, in): the error's gradient / 2
    d = torch.diagonal(h)
    before = ((deq - w) * g).sum().item()
    done = 0
    for _ in range(sweeps):
        moved = 0
        for j in range(w.shape[1]):
            q = onto(deq[:, j] - g[:, j] / d[j], scale[:, j], zero[:, j])
            delta = back(q, scale[:, j], zero[:, j]) - deq[:, j]
            nz = int(torch.count_nonzero(delta))
            if nz:
                g.addr_(delta, h[j])
                deq[:, j] += delta
                codes[:, j] = q
                moved += nz
        done += 1
        if not moved:
            break
    after = ((deq - w) * ((deq - w) @ h)).sum().item()
    return codes, {"sweeps": done, "error_ratio": round(after / before, 6) if before > 0 else 1.0}


@dataclass(frozen=True)
class GPTQ(MethodConfig):
    method = "gptq"
    family = "quantization"
    stat = "hessian"
    menu = QUANT_MENU
    bits: int = 4
    group_size: int = 128       # 0: per channel (one scale per output row)
    symmetric: bool = True
    # static act-order: the default of llm-compressor ("static") and GPTQModel (desc_act); free at
    # inference since the groups keep their original column layout
    act_order: bool = True
    damp: float = 0.01
    clip: str | None = None     # "mse": search each group's clipping range (Hessian-weighted error)
    # q4_1|q5_1|q2_k..q6_k|iq4_nl|iq4_xs|iq3_s|iq3_xxs|iq2_s|iq2_xs|iq2_xxs: solve ON that llama.cpp grid (fixes bits, group_size = its sub-block),
    # so the GGUF export holds exactly these weights; grids fitted up front (static)
    gguf: str | None = None
    # coordinate-descent sweeps after the GPTQ pass (QuantEase); None / 0: off
    refine: int | None = None
    # rounds of joint scale re-fit to the chosen codes + GPTQ sweep on the new grid (refit_scales); None / 0: off
    refit: int | None = None

    def __post_init__(self) -> None:
        fix_gguf_grid(self)
        super().__post_init__()

    def validate(self) -> None:
        check_quant_options(self.bits, self.group_size, self.clip, None if self.gguf else self.symmetric)
        check_gguf_clip(self)
        check_damp(self.damp)
        if self.refine is not None and (not isinstance(self.refine, int) or self.refine < 0):
            raise LLMPressError(f"refine (coordinate-descent sweeps) must be an integer >= 0, got {self.refine!r}")
        if self.refit is not None and (not isinstance(self.refit, int) or self.refit < 0):
            raise LLMPressError(f"refit (scale re-fit rounds) must be an integer >= 0, got {self.refit!r}")
        if self.refine and self.gguf and ggml_grid.is_codebook(ggml_grid.ggml_type(self.gguf)):
            raise LLMPressError(f"refine (coordinate descent over scalar grid points) does not apply to the codebook "
                                f"type gguf={self.gguf}")
        if self.refit and self.gguf:
            raise LLMPressError(f"refit is built for the uniform grids (bits / group_size); gguf={self.gguf} has "
                                "two-level scales")

    def shape_problem(self, out_features, in_features):
        return gguf_shape_problem(self, in_features)

    def rows_independent(self) -> bool:
        # rows are solved independently given H (solve_group stacks q/k/v for that reason); the refit
        # rounds are kept or dropped on the whole layer's error, a decision across rows
        return not self.refit

    def storage(self, out_features, in_features):
        if self.gguf:
            return gguf_storage(self, out_features, in_features)
        return quant_storage(self.bits, self.group_size, self.symmetric, out_features, in_features)


def refit_loop(w, h, codes, scale, zero, config, used_damp: float):
    """The scales re-fitted jointly to GPTQ's codes (refit_scales), then config.refit - 1 rounds of
    GPTQ's sweep again on those fixed scales and a re-fit; a round is kept only if the layer's error
    (on GPTQ's damped Hessian) falls. Returns (codes, scale, info)."""
    wp, hp, _ = hessian.prepare(w, h)
    hp = damped(hp, used_damp)
    gs = config.group_size or w.shape[1]
    codes0, scale0 = codes, scale
    before = quant_error(wp, hp, codes, scale, zero, gs)
    scale = refit_scales(wp, hp, codes, scale, zero, gs)          # the sweep's codes, their best scales
    err = quant_error(wp, hp, codes, scale, zero, gs)
    rounds = 1
    for _ in range(config.refit - 1):          # then: sweep again on those scales, re-fit, keep if better
        new_codes, _, _, _ = gptq_solve(w, h, config.bits, config.group_size, config.symmetric, config.act_order,
                                        config.damp, None, None, config.refine or 0, fixed=(scale, zero))
        new_scale = refit_scales(wp, hp, new_codes, scale, zero, gs)
        new_err = quant_error(wp, hp, new_codes, new_scale, zero, gs)
        if not new_err < err:
            break
        codes, scale, err, rounds = new_codes, new_scale, new_err, rounds + 1
    if not err < before:                       # fp16 rounding of the re-fitted scales can undo a tiny gain
        return codes0, scale0, {"rounds": 0, "error_ratio": 1.0}
    return codes, scale, {"rounds": rounds, "error_ratio": round(err / before, 6) if before > 0 else 1.0}


def solve_group(linears, config: GPTQ, stats):
    """Members of an input group share H, and GPTQ treats rows independently given H: stack them."""
    w = torch.cat([m.weight.detach() for m in linears])              # (sum out_k, in)
    h = stats.hessian()
    grid = parts = levels = codes = None
    t = ggml_grid.ggml_type(config.gguf) if config.gguf else None
    if t is not None and ggml_grid.is_codebook(t):       # the codewords live in parts
        parts, info = gptq_codebook_solve(w, h, t, config.act_order, config.damp)
    else:
        if config.gguf:   # the GGUF grid, fitted from the original weights (Hessian-weighted clip search)
            scale, offset, parts = ggml_grid.fit(w.float(), t, config.clip, torch.diagonal(h).float())
            grid, levels = (scale, offset), t.levels
        codes, scale, zero, info = gptq_solve(w, h, config.bits, config.group_size, config.symmetric,
                                              config.act_order, config.damp, config.clip, grid, config.refine or 0,
                                              levels=levels)
        if config.refit and not config.gguf and "fallback" not in info:
            codes, scale, info["refit"] = refit_loop(w, h, codes, scale, zero, config, info["damp"])
    out, start = [], 0
    for m in linears:
        rows = slice(start, start + m.out_features)
        start += m.out_features
        if config.gguf:
            module = ggml_linear_from_codes(m, config.gguf, None if codes is None else codes[rows],
                                            {k: v[rows] for k, v in parts.items()})
        else:
            module = quant_linear_from_codes(m, codes[rows], scale[rows], zero[rows], config.bits,
                                             config.group_size, config.symmetric)
        out.append((module, dict(info)))
    return out


@register(GPTQ, group_solver=solve_group)
def apply_gptq(linear, config: GPTQ, stats):
    return solve_group([linear], config, stats)[0]
