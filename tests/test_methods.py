import math

import pytest
import torch

from llmpress.methods.lowrank import rank_for_ratio, svd_factors
from llmpress.methods.magnitude import magnitude_mask, nm_mask
from llmpress.methods.rtn import rtn_quantize
from llmpress.modules import QuantLinear, SparseLinear, pack_bits, unpack_bits
from llmpress import LLMPressError


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2 ** bits, (37, 11), dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.numel() == math.ceil(q.numel() * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, q.numel()).view_as(q), q)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (8, 128), (2, 32)])
def test_rtn_weights_lie_on_the_grid(bits, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(16, 576)              # 576 = 4 * 128 + 64: the last group is shorter
    q, scale, zero = rtn_quantize(w, bits, group_size, symmetric)
    assert scale.shape == (16, math.ceil(576 / group_size))
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1 and torch.equal(q, q.round())
    g = torch.arange(576) // group_size
    deq = (q - zero[:, g]) * scale[:, g]
    # rounding error: half a step; an asymmetric grid's rounded zero point can push an extreme
    # weight up to one step past the clamped range
    err = (deq - w).abs() / scale[:, g]
    assert err.max() <= (0.5 + 1e-4 if symmetric else 1.0)
    assert (err <= 0.5 + 1e-4).float().mean() > 0.99
    # more bits, less error
    if bits < 8:
        q8, s8, z8 = rtn_quantize(w, 8, group_size, symmetric)
        assert ((q8 - z8[:, g]) * s8[:, g] - w).square().sum() < (deq - w).square().sum()


def test_quantlinear_dequant_matches_codes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 8, bias=False)
    q, scale, zero = rtn_quantize(lin.weight.detach(), 4, 128, False)
    from llmpress.methods.rtn import quant_linear_from_codes
    ql = quant_linear_from_codes(lin, q, scale, zero, 4, 128, False)
    g = torch.arange(576) // 128
    expected = (q - zero[:, g]) * scale.half().float()[:, g]
    assert torch.equal(ql.dense_weight(), expected)
    assert ql.stored_bytes() == 8 * 576 // 2 + 8 * 5 * 2 + math.ceil(8 * 5 * 4 / 8)


def test_magnitude_exact_sparsity_and_choice():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    mask = magnitude_mask(w, 0.5, None)
    assert (~mask).sum().item() == 64 * 96 // 2
    assert w.abs()[mask].min() >= w.abs()[~mask].max()     # the smallest are the ones dropped


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_structure(n, m):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    mask = nm_mask(w.abs(), n, m)
    assert torch.all(mask.view(32, -1, m).sum(-1) == n)
    sl = SparseLinear.from_dense(w, mask)
    assert torch.equal(sl.dense_weight() != 0, mask)
    with pytest.raises(LLMPressError, match="divisible"):
        nm_mask(torch.randn(4, 30), n, m)


def test_svd_exact_rank_and_error_is_discarded_energy():
    torch.manual_seed(0)
    w = torch.randn(48, 80, dtype=torch.float64).float()
    r = rank_for_ratio(48, 80, 0.5)
    assert r == int(0.5 * 48 * 80 // (48 + 80))
    up, down = svd_factors(w, r)
    assert up.shape == (48, r) and down.shape == (r, 80)
    approx = up.double() @ down.double()
    assert torch.linalg.matrix_rank(approx).item() == r
    s = torch.linalg.svdvals(w.double())
    assert torch.allclose((approx - w.double()).square().sum(), s[r:].square().sum(), rtol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_layers_run_packed_in_bfloat16(symmetric):
    """bf16 activations go through torch's int4 kernel (no dense weight built); the result matches
    the dequantized weight up to bf16 rounding of activations and scales."""
    from llmpress.methods.rtn import RTN, apply_rtn
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True)
    q, _ = apply_rtn(linear, RTN(bits=4, group_size=32, symmetric=symmetric), None)
    x = torch.randn(3, 5, 128)
    ref = torch.nn.functional.linear(x, q.dense_weight(), q.bias.float())
    xb = x.to(torch.bfloat16)
    assert q.runs_packed(xb) and not q.runs_packed(x)
    built = []
    q.dense_weight = lambda: built.append(1)           # the packed path must not rebuild it
    y = q(xb)
    assert not built and y.dtype == torch.bfloat16 and y.shape == (3, 5, 96)
    assert (y.float() - ref).abs().max() < 0.03 * ref.abs().max()
    assert q._packed[0].numel() == 96 * 128 // 2          # half a byte per weight


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_gguf_block_encoders_are_bit_exact(bits):
    """Our Q4_0 / Q5_0 / Q8_0 bytes, decoded by gguf-py's reference dequantizer, give the layer's weight."""
    import gguf
    import numpy as np
    from llmpress.gguf_export import BITS_TYPE, ENCODERS
    from llmpress.methods.rtn import RTN, apply_rtn
    torch.manual_seed(1)
    q, _ = apply_rtn(torch.nn.Linear(96, 40, bias=False), RTN(bits=bits, group_size=32), None)
    encode = ENCODERS[BITS_TYPE[bits]]
    kind = getattr(gguf.GGMLQuantizationType, BITS_TYPE[bits])
    assert q.int_weight().max() >= 2 ** (bits - 1)              # the top bit is exercised
    decoded = gguf.quants.dequantize(encode(q.int_weight(), q.scale), kind)
    assert np.array_equal(decoded.astype(np.float32), q.dense_weight().numpy())


def test_int8_per_channel_layers_run_packed_in_bfloat16():
    from llmpress.methods.rtn import RTN, apply_rtn
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    q, _ = apply_rtn(linear, RTN(bits=8, group_size=4096), None)       # one group: per channel
    x = torch.randn(2, 7, 96)
    ref = torch.nn.functional.linear(x, q.dense_weight())
    xb = x.to(torch.bfloat16)
    assert q.runs_packed(xb)
    y = q(xb)
    assert q._packed[0].dtype == torch.int8 and (y.float() - ref).abs().max() < 0.02 * ref.abs().max()
    grouped, _ = apply_rtn(linear, RTN(bits=8, group_size=32), None)
    assert not grouped.runs_packed(xb)                                  # the kernel has one scale per row


def test_series_expansion_converges_term_by_term_and_costs_what_it_stores():
    from llmpress import RTN, Series
    from llmpress.config import handler_for
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 24)
    w = linear.weight.detach()
    errors = []
    for terms in (1, 2, 3):
        config = Series(bits=2, terms=terms, group_size=32)
        module, _ = handler_for(config)(linear, config, None)
        assert len(module.terms) == terms
        assert module.stored_bytes() - 2 * 24 == config.storage(24, 96)[0]     # + the fp16 bias
        errors.append((module.dense_weight() - w).square().sum().item())
        x = torch.randn(5, 96)
        assert torch.allclose(module(x), x @ module.dense_weight().T + module.bias.float(), atol=1e-5)
        if terms == 1:          # one term is round to nearest
            rtn, _ = handler_for(RTN(bits=2, group_size=32))(linear, RTN(bits=2, group_size=32), None)
            assert torch.equal(module.dense_weight(), rtn.dense_weight())
    assert errors[1] < errors[0] / 4 and errors[2] < errors[1] / 4
