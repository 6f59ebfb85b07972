"""Quantizing ON llama.cpp's codebook types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S): bytes
bit-exact against gguf-py, every layout bit round-trips, nearest() is the exact constrained optimum."""
import itertools

import numpy as np
import pytest
import torch

from llmpress.errors import LLMPressError
from llmpress.methods import ggml_codebook as gc

TYPES = list(gc.TYPES)
# relative weight error of round_to_grid on the layer below (measured 0.371 / 0.317 / 0.279 / 0.187 / 0.142)
BANDS = {"iq2_xxs": 0.40, "iq2_xs": 0.35, "iq2_s": 0.31, "iq3_xxs": 0.21, "iq3_s": 0.17}


def _gguf_type(t):
    import gguf
    return getattr(gguf.GGMLQuantizationType, t.name)


def _weights(rows=16, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :256] = 0.0                                  # an all-zero super-block
    w[2, 7] = 1.5                                     # an outlier
    return w


@pytest.mark.parametrize("kind", TYPES)
def test_types_match_gguf(kind):
    import gguf
    t = gc.TYPES[kind]
    assert gguf.GGML_QUANT_SIZES[_gguf_type(t)] == (t.block, t.nbytes)
    assert gc.codebook(t).shape == (t.entries, t.dim) and gc.codebook(t).min() > 0
    assert gc.codebook_type(t.name) is t and gc.row_bytes(t, 768) == 3 * t.nbytes


@pytest.mark.parametrize("kind", TYPES)
def test_round_to_grid_bytes_decode_like_gguf_py(kind):
    """The fitted bytes dequantize in gguf-py to exactly the returned weights; their size is the
    GGUF size; an all-zero super-block stays exactly zero; the error is in a sane band."""
    import gguf
    t = gc.TYPES[kind]
    w = _weights()
    deq, parts = gc.round_to_grid(w, t)
    raw = gc.encode(t, **parts)
    block, size = gguf.GGML_QUANT_SIZES[_gguf_type(t)]
    assert raw.dtype == torch.uint8 and raw.shape == (16, gc.row_bytes(t, 512)) == (16, 512 // block * size)
    assert np.array_equal(gguf.quants.dequantize(raw.numpy(), _gguf_type(t)), deq.numpy())
    assert torch.equal(gc.decode(t, raw, 512), deq)
    for got, want in zip(gc.decode_parts(t, raw, 512), (parts["idx"], parts["signs"], parts["d"], parts["ls"])):
        assert torch.equal(got, want.to(got.dtype))
    assert torch.equal(deq[0, :256], torch.zeros(256)) and parts["d"][0, 0] == 0
    err = ((deq - w).norm() / w.norm()).item()
    assert 0 < err < BANDS[kind]


def _random_parts(t, rows, cols, g):
    idx = torch.randint(0, t.entries, (rows, cols // t.dim), generator=g)
    idx[0, :2] = torch.tensor([0, t.entries - 1])
    neg = torch.randint(0, 2, (rows, cols // 8, 8), generator=g)
    if not t.free_signs:                              # make every group's count of negatives even
        neg[..., 7] = neg[..., :7].sum(-1) % 2
    signs = torch.where(neg.reshape(rows, cols) > 0, -1.0, 1.0)
    d = (torch.randn(rows, cols // 256, generator=g) * 0.01).to(torch.float16)
    ls = torch.randint(0, 16, (rows, cols // t.sub), generator=g)
    ls[0, :2] = torch.tensor([0, 15])
    return idx, signs, d, ls


@pytest.mark.parametrize("kind", TYPES)
def test_every_layout_bit_round_trips(kind):
    """Random bytes -> parts -> the same bytes (so every bit is read: decode_parts is injective and
    every byte pattern is a valid block); random parts -> bytes -> the same parts; and gguf-py
    dequantizes random blocks (finite d) exactly as decode does."""
    import gguf
    t = gc.TYPES[kind]
    rows, cols = 16, 1024
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (rows, gc.row_bytes(t, cols)), dtype=torch.uint8, generator=g)
    bits = (raw.view(rows * cols // 256, t.nbytes)[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1
    assert bool((bits.amax(0) == 1).all() and (bits.amin(0) == 0).all())      # each bit seen both ways
    assert torch.equal(gc.encode(t, *gc.decode_parts(t, raw, cols)), raw)

    parts = _random_parts(t, rows, cols, g)
    raw = gc.encode(t, *parts)
    for got, want in zip(gc.decode_parts(t, raw, cols), parts):
        assert torch.equal(got, want.to(got.dtype))
    ref = gguf.quants.dequantize(raw.numpy(), _gguf_type(t))
    assert np.array_equal(ref, gc.decode(t, raw, cols).numpy())
    assert torch.equal(torch.from_numpy(ref).abs() > 0, parts[2].float().repeat_interleave(256, -1) != 0)


@pytest.mark.parametrize("kind", TYPES)
def test_nearest_is_the_exact_constrained_optimum(kind):
    """Against brute force over every codeword and every valid sign pattern (all 2**dim, or those
    with an even number of negatives in each 8 for the parity types)."""
    t = gc.TYPES[kind]
    g = torch.Generator().manual_seed(2)
    grid = gc.codebook(t)
    n = 6 if t.dim == 8 else 12                      # parity spans 8 weights = two 4-codewords (IQ3_XXS)
    x = torch.randn(n, t.dim, generator=g) * float(grid.max()) / 2.5
    x[0, :2] = 0.0
    wt = torch.rand(n, t.dim, generator=g) + 0.05
    idx, signs = gc.nearest(t, x, wt)
    assert set(signs.unique().tolist()) <= {-1.0, 1.0}
    got = (wt * (x - signs * grid[idx]) ** 2).sum(-1)
    pats = torch.tensor(list(itertools.product([1.0, -1.0], repeat=t.dim)))              # (P, dim)
    if not t.free_signs and t.dim == 8:
        pats = pats[(pats < 0).sum(-1) % 2 == 0]
        assert torch.equal((signs < 0).sum(-1) % 2, torch.zeros(n, dtype=torch.long))
    cost = (wt[:, None, None] * (x[:, None, None] - pats[None, :, None] * grid[None, None]) ** 2).sum(-1)
    if not t.free_signs and t.dim == 4:              # IQ3_XXS: parity over pairs of codewords
        c = cost.view(n // 2, 2, len(pats), t.entries).amin(-1)                          # (pairs, 2, P)
        even = (pats < 0).sum(-1) % 2
        best = torch.stack([c[:, 0, even == p].amin(-1) + c[:, 1, even == p].amin(-1) for p in (0, 1)]).amin(0)
        assert torch.equal((signs < 0).view(n // 2, 8).sum(-1) % 2, torch.zeros(n // 2, dtype=torch.long))
        assert torch.allclose(got.view(n // 2, 2).sum(-1), best, rtol=1e-5)
    else:
        assert torch.allclose(got, cost.flatten(1).amin(-1), rtol=1e-5)


@pytest.mark.parametrize("kind", TYPES)
def test_importance_weights_lower_the_weighted_error(kind):
    t = gc.TYPES[kind]
    w = _weights(rows=11, seed=3)[3:]
    imp = torch.exp(torch.randn(512, generator=torch.Generator().manual_seed(4)) * 1.5)
    plain, _ = gc.round_to_grid(w, t)
    weighted, parts = gc.round_to_grid(w, t, imp)
    assert torch.equal(gc.decode(t, gc.encode(t, **parts), 512), weighted)
    assert ((weighted - w) ** 2 * imp).sum() < 0.9 * ((plain - w) ** 2 * imp).sum()


def test_bad_inputs_are_refused_clearly():
    t = gc.TYPES["iq2_xxs"]
    assert "whole 256-weight blocks" in gc.shape_problem(t, 300) and gc.shape_problem(t, 512) is None
    with pytest.raises(LLMPressError, match="whole 256-weight blocks"):
        gc.round_to_grid(torch.zeros(2, 300), t)
    with pytest.raises(LLMPressError, match="iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s"):
        gc.codebook_type("IQ1_S")
    for kind in TYPES:
        t = gc.TYPES[kind]
        idx, signs, d, ls = _random_parts(t, 2, 256, torch.Generator().manual_seed(5))
        signs[1, 3] *= -1                             # one group of 8 with an odd count of negatives
        if t.free_signs:
            assert gc.decode_parts(t, gc.encode(t, idx, signs, d, ls), 256)[1].equal(signs)
        else:
            with pytest.raises(LLMPressError, match="odd number"):
                gc.encode(t, idx, signs, d, ls)
        with pytest.raises(LLMPressError, match="outside"):
            gc.encode(t, idx, signs.abs(), d, ls + 16)


@pytest.mark.parametrize("kind", TYPES)
def test_rtn_and_awq_layers_on_a_codebook_type(kind):
    """RTN(gguf=...) and AWQ(gguf=...) store the type's GGML bytes (a GGMLLinear counted as the GGUF
    size), which gguf-py decodes to exactly the layer's weight; clip does not apply to these types."""
    import gguf
    from llmpress.methods.awq import AWQ
    from llmpress.methods.rtn import RTN, apply_rtn
    from llmpress.modules import GGMLLinear
    t = gc.TYPES[kind]
    lin = torch.nn.Linear(512, 16, bias=True)
    with torch.no_grad():
        lin.weight.copy_(_weights())
    q, _ = apply_rtn(lin, RTN(gguf=kind), None)
    assert isinstance(q, GGMLLinear) and q.raw.numel() == RTN(gguf=kind).storage(16, 512)[0] == 16 * gc.row_bytes(t, 512)
    assert np.array_equal(gguf.quants.dequantize(q.raw.numpy(), _gguf_type(t)), q.dense_weight().numpy())
    assert torch.equal(q.dense_weight(), gc.round_to_grid(lin.weight.detach(), t)[0]) and torch.equal(q.bias, lin.bias.detach().half())
    assert AWQ(gguf=kind).bits == t.bits and not q.runs_packed(torch.randn(2, 512).to(torch.bfloat16))
    with pytest.raises(LLMPressError, match="does not apply"):
        AWQ(gguf=kind, clip="mse")
