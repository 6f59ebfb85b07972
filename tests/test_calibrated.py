"""Calibrated methods against their data-free baselines, in output space ||W X - W' X||."""
import pytest
import torch

from llmpress import ASVD, GPTQ, LLMPressError, Plan, RTN, SVD, SVDLLM, SparseGPT, Wanda, Magnitude
from llmpress.config import handler_for
from llmpress.stats import InputStats


def correlated_layer(seed=0, out_f=64, in_f=128, n=4096):
    """An nn.Linear and inputs X = Z @ A with outlier channels, so H is far from identity."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    a = a * torch.linspace(1.0, 0.1, in_f)[None, :]                 # decaying spectrum
    channel_scale = torch.exp(0.5 * torch.randn(in_f, generator=g))  # louder and quieter channels
    x = (torch.randn(n, in_f, generator=g) @ a) * channel_scale
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
    stats = InputStats(in_f)
    stats.add(x)
    return linear, x, stats


def output_error(linear, new, x):
    return ((x @ linear.weight.T - x @ new.dense_weight().T).square().sum() /
            (x @ linear.weight.T).square().sum()).item()


def err_of(config, seed=0):
    linear, x, stats = correlated_layer(seed)
    new, info = handler_for(config)(linear, config, stats)
    return output_error(linear, new, x), new, info


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_beats_rtn(bits, seed):
    e_gptq, new, info = err_of(GPTQ(bits=bits, group_size=32), seed)
    e_rtn, _, _ = err_of(RTN(bits=bits, group_size=32), seed)
    assert e_gptq < 0.8 * e_rtn
    assert info["damp"] == 0.01
    e_act, _, _ = err_of(GPTQ(bits=bits, group_size=32, act_order=True), seed)
    assert e_act < e_rtn


def test_gptq_codes_on_grid_and_identity_hessian_equals_rtn():
    from llmpress.methods.gptq import gptq_solve
    from llmpress.methods.rtn import rtn_quantize
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    q, s, z, info = gptq_solve(w, torch.eye(96), 4, 32, True, damp=1e-9)
    assert q.min() >= 0 and q.max() <= 15 and torch.equal(q, q.round())
    q_rtn, s_rtn, z_rtn = rtn_quantize(w, 4, 32, True)
    assert torch.equal(q, q_rtn) and torch.equal(s, s_rtn)   # no correlations: nothing to compensate


@pytest.mark.parametrize("prune", [dict(sparsity=0.5), dict(sparsity=None, nm="2:4"), dict(sparsity=None, nm="4:8")])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_le_wanda_lt_magnitude(prune, seed):
    e_sgpt, sgpt, _ = err_of(SparseGPT(**prune), seed)
    e_wanda, wanda, _ = err_of(Wanda(**prune), seed)
    e_mag, _, _ = err_of(Magnitude(**prune), seed)
    assert e_sgpt <= e_wanda < e_mag
    for module in (sgpt, wanda):
        mask = module.bool_mask()
        if prune.get("nm"):
            n, m = map(int, prune["nm"].split(":"))
            assert torch.all(mask.view(64, -1, m).sum(-1) == n)
        else:
            assert (~mask).sum().item() == 64 * 128 // 2
        assert torch.equal(module.dense_weight() != 0, mask)


@pytest.mark.parametrize("prune", [{"sparsity": 0.5}, {"sparsity": None, "nm": "2:4"}])
def test_sparsegpt_input_group_solved_stacked_equals_each_layer_alone(prune):
    """q/k/v (one Hessian) go through one sweep: the same weights and masks as solving each alone,
    the unstructured quota kept per layer."""
    from llmpress.methods.sparsegpt import solve_group
    linear, _, stats = correlated_layer(3)
    g = torch.Generator().manual_seed(1)
    others = [torch.nn.Linear(128, o, bias=False) for o in (32, 16)]
    with torch.no_grad():
        for m in others:
            m.weight.copy_(torch.randn(m.out_features, 128, generator=g) / 128 ** 0.5)
    config = SparseGPT(**prune)
    stacked = solve_group([linear, *others], config, stats)
    for m, (module, info) in zip([linear, *others], stacked):
        alone, _ = handler_for(config)(m, config, stats)
        assert torch.equal(module.dense_weight(), alone.dense_weight()) and "fallback" not in info
        if not prune.get("nm"):
            assert (~module.bool_mask()).sum().item() == m.out_features * 128 // 2


def test_wanda_compares_within_rows():
    _, new, _ = err_of(Wanda(sparsity=0.5))
    assert torch.all(new.bool_mask().sum(1) == 64)


@pytest.mark.parametrize("ratio", [0.8, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_svd_llm_lt_asvd_lt_svd(ratio, seed):
    e_llm, new, _ = err_of(SVDLLM(param_ratio=ratio), seed)
    e_asvd, _, _ = err_of(ASVD(param_ratio=ratio), seed)
    e_svd, _, _ = err_of(SVD(param_ratio=ratio), seed)
    assert e_llm < e_asvd < e_svd
    assert new.rank == int(ratio * 64 * 128 // (64 + 128))


def test_whitened_svd_error_is_discarded_energy():
    from llmpress.methods.lowrank import whitened_svd_factors
    linear, x, stats = correlated_layer()
    w, gram = linear.weight.detach(), stats.gram_matrix().double()
    up, down, damp = whitened_svd_factors(w, gram, 20)
    lower = torch.linalg.cholesky(gram)
    s = torch.linalg.svdvals(w.double() @ lower)
    err = (x.double() @ (w.double() - up.double() @ down.double()).T).square().sum()
    assert damp == 0.0
    assert torch.allclose(err, s[20:].square().sum(), rtol=1e-3)


def test_cholesky_failure_is_survived_and_recorded():
    from llmpress.methods.gptq import gptq_solve
    from llmpress.methods.sparsegpt import sparsegpt_solve
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    bad = -torch.eye(32) * 1e3 + torch.ones(32, 32)      # indefinite: no damping level rescues it
    q, _, _, info = gptq_solve(w, bad, 4, 16, True)
    assert info["fallback"] == "rtn" and q.max() <= 15
    pruned, mask, info = sparsegpt_solve(w, bad, 0.5, None)
    assert info["fallback"] == "magnitude" and (~mask).sum() == 8 * 16


def test_all_zero_inputs_are_survived():
    """A layer that never sees a nonzero input: every column is dead, the solvers still finish."""
    linear = torch.nn.Linear(32, 8, bias=False)
    stats = InputStats(32)
    stats.add(torch.zeros(64, 32))
    for config in (GPTQ(bits=4, group_size=16), SparseGPT(sparsity=0.5), SVDLLM(param_ratio=0.5)):
        new, info = handler_for(config)(linear, config, stats)
        assert torch.isfinite(new.dense_weight()).all()
    assert info["damp"] > 0


def test_calibrated_pipeline_on_tiny_model(tiny_model, calib_tokens):
    from llmpress.arch import adapter_for
    from llmpress.pipeline import compress
    ids = calib_tokens[:2]
    before = tiny_model(ids).logits
    plan = Plan([("*.self_attn.*", GPTQ(bits=4, group_size=32)), ("*.gate_proj", Wanda(sparsity=0.5)),
                 ("*.up_proj", SparseGPT(sparsity=None, nm="2:4")), ("*", SVDLLM(param_ratio=0.6))])
    report = compress(tiny_model, plan.resolve(adapter_for(tiny_model).linear_names(tiny_model)), calib_tokens,
                      batch_size=3, progress=False)
    assert len(report.layers) == 14
    assert report.layers["model.layers.1.self_attn.q_proj"]["damp"] == 0.01
    assert not torch.allclose(tiny_model(ids).logits, before)
    with pytest.raises(LLMPressError, match="calibration tokens"):
        compress(tiny_model, {"model.layers.0.mlp.down_proj": GPTQ()}, None, progress=False)


def test_awq_fold_preserves_the_function_and_beats_rtn(tiny_model, calib_tokens):
    import copy
    from llmpress import AWQ
    from llmpress.arch import adapter_for
    from llmpress.methods.awq import awq_group_transform
    from llmpress.pipeline import compress
    from llmpress.walk import BlockWalk

    adapter = adapter_for(tiny_model)
    blocks = adapter.blocks(tiny_model)
    # loud input channels, as in real LLMs: AWQ's scales then matter
    with torch.no_grad():
        blocks[0].input_layernorm.weight.mul_(torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(0))))
    reference = copy.deepcopy(tiny_model)
    walk = BlockWalk(tiny_model, batch_size=4, progress=False)
    hidden = walk.capture(calib_tokens)
    kwargs = walk.kwargs
    block = blocks[0]
    before = block(hidden, **kwargs)[0]
    _, stats = walk.collect(block, hidden, walk.all_heads())
    norm_before = block.input_layernorm.weight.clone()
    info = awq_group_transform(block, adapter, "self_attn.q_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                               [AWQ(bits=3, group_size=16)] * 3, stats["self_attn.q_proj"])
    assert info["awq_alpha"] > 0 and info["awq_folded_into"] == "input_layernorm"
    assert not torch.equal(block.input_layernorm.weight, norm_before)
    assert torch.allclose(block(hidden, **kwargs)[0], before, atol=1e-5)     # same function

    def model_error(config):
        m = copy.deepcopy(reference)
        compress(m, Plan.uniform(config).resolve(adapter.linear_names(m)), calib_tokens, progress=False)
        return (m(calib_tokens).logits - reference(calib_tokens).logits).square().mean().item()
    assert model_error(AWQ(bits=3, group_size=16)) < model_error(RTN(bits=3, group_size=16))


def test_awq_under_gqa_reports_plain_rtn_for_o_proj(tiny_model, calib_tokens):
    from llmpress import AWQ
    from llmpress.arch import adapter_for
    from llmpress.pipeline import compress
    report = compress(tiny_model, Plan.uniform(AWQ(bits=4, group_size=16)).resolve(adapter_for(tiny_model).linear_names(tiny_model)),
                      calib_tokens, progress=False)
    o = report.layers["model.layers.0.self_attn.o_proj"]
    assert "plain RTN" in o.get("awq", "") or o.get("awq_alpha") == 0.0
    assert report.layers["model.layers.0.mlp.down_proj"].get("awq_folded_into") in ("mlp.up_proj", None)


def test_gptq_group_solve_equals_per_layer_solve():
    from llmpress.methods.gptq import solve_group
    linear, x, stats = correlated_layer()
    other = torch.nn.Linear(128, 32, bias=False)
    config = GPTQ(bits=3, group_size=32, act_order=True)
    joint = solve_group([linear, other], config, stats)
    alone = [handler_for(config)(m, config, stats)[0] for m in (linear, other)]
    for (j, _), a in zip(joint, alone):
        assert torch.allclose(j.dense_weight(), a.dense_weight(), atol=1e-6)
