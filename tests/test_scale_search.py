"""clip=search (llama.cpp's importance-weighted signed scale search) and GPTQ's refit (scales
re-fitted jointly to the chosen codes in the Hessian metric): on the grid, all 2**b levels used,
lower output error than the fixed-range grids, Q4_0 bytes that decode to the layer's weight."""
import numpy as np
import pytest
import torch

from llmpress.errors import LLMPressError
from llmpress.methods import hessian
from llmpress.methods.gptq import GPTQ, gptq_solve, quant_error, refit_scales
from llmpress.methods.rtn import RTN, search_scale


def _layer(out_f=64, in_f=256, seed=0):
    """Weights and a Hessian of correlated inputs (X = Z A), far from the identity."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) * 0.1 + torch.eye(in_f))
    x = x * torch.rand(in_f, generator=g) * 2                      # columns of different importance
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[3, 5] = 0.6                                                  # a positive outlier: a negative scale
    return w, x.T @ x / x.shape[0]


def test_search_scale_uses_every_level_and_lowers_the_weighted_error():
    w, h = _layer()
    imp = torch.diagonal(h)
    group = w[:, :32]
    scale, zero = search_scale(group, 4, imp[:32])
    assert torch.equal(scale, scale.half().float()) and torch.all(zero == 8)
    q = torch.clamp(torch.round(group / scale[:, None]) + 8, 0, 15)
    assert scale[3] < 0 and q[3, 5] == 0                           # the positive peak takes level -8
    deq = (q - 8) * scale[:, None]
    from llmpress.methods.rtn import quant_grid
    s_old, z_old = quant_grid(group, 4, True)                        # range absmax / 7.5, no search
    old = (torch.clamp(torch.round(group / s_old[:, None]) + z_old[:, None], 0, 15) - z_old[:, None]) * s_old[:, None]
    err = lambda d: ((d - group) ** 2 * imp[:32]).sum().item()
    assert err(deq) < 0.8 * err(old)


def test_gptq_search_and_refit_lower_gptqs_own_objective():
    w, h = _layer()
    errors = {}
    for clip in (None, "mse", "search"):
        codes, scale, zero, info = gptq_solve(w, h, 4, 32, True, True, 0.01, clip)
        wp, hp, _ = hessian.prepare(w, h)
        hp = hp.float()
        hp.diagonal().add_(info["damp"] * torch.diagonal(hp).mean())
        errors[clip] = quant_error(wp, hp, codes, scale, zero, 32)
        if clip == "search":
            refit = refit_scales(wp, hp, codes, scale, zero, 32)
            assert torch.equal(refit, refit.half().float())
            errors["refit"] = quant_error(wp, hp, codes, refit, zero, 32)
    assert errors["search"] < 0.95 * min(errors[None], errors["mse"])
    assert errors["refit"] < errors["search"]


def test_refit_through_the_method_records_its_rounds_and_exports_as_q4_0(tmp_path):
    """GPTQ W4 g32 clip=search refit=3 on a layer: lower output error than plain GPTQ, the rounds in
    the info, and Q4_0 blocks (negative d included) that gguf-py decodes to exactly the layer's weight."""
    import gguf
    from llmpress.gguf_export import encode_q4_0
    from llmpress.methods.gptq import apply_gptq
    from llmpress.stats import InputStats
    w, h = _layer(in_f=128)
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data.copy_(w)
    stats = InputStats(128)
    x = torch.linalg.cholesky(h + 1e-6 * torch.eye(128)).T.contiguous()       # x^T x = h
    stats.add(x)
    outs = {}
    for key, cfg in {"plain": GPTQ(bits=4, group_size=32), "refit": GPTQ(bits=4, group_size=32, clip="search", refit=3)}.items():
        q, info = apply_gptq(lin, cfg, stats)
        d = q.dense_weight() - w
        outs[key] = (((d @ h) * d).sum().item(), info, q)
    assert outs["refit"][0] < 0.9 * outs["plain"][0]
    assert outs["refit"][1]["refit"]["rounds"] >= 1 and outs["refit"][1]["refit"]["error_ratio"] < 1
    q = outs["refit"][2]
    assert (q.scale < 0).any()
    raw = encode_q4_0(q.int_weight(), q.scale)
    assert np.array_equal(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0), q.dense_weight().numpy())


def test_search_and_refit_refuse_what_they_do_not_cover():
    with pytest.raises(LLMPressError, match="symmetric grids"):
        GPTQ(bits=4, group_size=32, symmetric=False, clip="search")
    with pytest.raises(LLMPressError, match="does not apply"):
        RTN(gguf="iq4_xs", clip="search")
    with pytest.raises(LLMPressError, match="two-level scales"):
        GPTQ(gguf="q4_k", refit=2)
    with pytest.raises(LLMPressError, match="refit"):
        GPTQ(refit=-1)


@pytest.mark.parametrize("kind", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_1", "q5_1"])
def test_search_on_the_gguf_grids_lowers_gptqs_error_and_stays_exact(kind):
    """clip=search on llama.cpp's uniform block grids (make_qx_quants' signed scales for Q3_K / Q6_K,
    the peak sub-block stored at -32 / -128; make_qkx2_quants' scale and min for the others): GPTQ's
    output error on correlated inputs falls below its min-max grid's, and the bytes still decode in
    gguf-py to exactly the layer's weight."""
    import gguf
    from llmpress.methods import ggml_grid
    from llmpress.methods.gptq import solve_group
    torch.manual_seed(0)
    w = torch.randn(32, 512) * 0.05
    w[3, 5] = 0.8
    x = torch.randn(2048, 512) @ (torch.eye(512) + torch.randn(512, 512) / 512 ** 0.5)
    x[:, :16] *= 6                                   # a few inputs matter much more

    class Stats:
        def hessian(self):
            return x.T @ x / x.shape[0]

    lin = torch.nn.Linear(512, 32, bias=False)
    lin.weight.data = w.clone()
    errs = {}
    for clip in (None, "search"):
        (q, info), = solve_group([lin], GPTQ(gguf=kind, clip=clip), Stats())
        errs[clip] = ((q.dense_weight() - w) @ x.T).norm().item()
        t = ggml_grid.TYPES[kind]
        ref = gguf.quants.dequantize(q.raw.numpy(), getattr(gguf.GGMLQuantizationType, t.name))
        assert np.array_equal(ref, q.dense_weight().numpy())
    # 4- / 5-bit asymmetric grids on gaussian weights: min-max is already close (measured 0.97-0.99)
    assert errs["search"] < (0.95 if kind in ("q2_k", "q3_k", "q6_k") else 1.0) * errs[None]
    if kind in ("q3_k", "q6_k"):
        _, scale, _ = ggml_grid.decode_parts(t, q.raw, 512)
        assert (scale < 0).any() and (scale > 0).any()
