"""compress(sequential=..., reference=...): statistics measured after the earlier groups of a block
were compressed, and asymmetric calibration toward the uncompressed model's outputs (GPTAQ)."""
import copy

import pytest
import torch

from conftest import needs_embedded, tiny_llama
from llmpress import GPTQ
from llmpress.arch import adapter_for
from llmpress.errors import LLMPressError
from llmpress.methods.hessian import toward_reference
from llmpress.pipeline import compress
from llmpress.stats import InputStats


def test_toward_reference_is_the_least_squares_fit_of_the_reference_outputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=g)
    x_ref = x + 0.3 * torch.randn(400, 24, generator=g)            # the uncompressed model's inputs
    w = torch.randn(10, 24, generator=g)
    stats = InputStats(24)
    for k in range(0, 400, 100):                                   # batches add up
        stats.add(x[k:k + 100], x_ref[k:k + 100])
    target, rel = toward_reference(w, stats, 1.0, damp=1e-9)
    lstsq = torch.linalg.lstsq(x.double(), (x_ref @ w.T).double()).solution.T     # argmin ||X Q^T - X_ref W^T||
    assert torch.allclose(target.double(), lstsq, atol=1e-4) and rel > 0.05
    # the objective splits: ||Q X - W X_ref||^2 = ||(Q - W*) X||^2 + the same constant for every Q
    consts = []
    for seed in range(3):
        q = torch.randn(10, 24, generator=torch.Generator().manual_seed(seed + 1))
        full = (x @ q.T - x_ref @ w.T).double().square().sum()
        consts.append(full - (x @ (q - target).T).double().square().sum())
    assert max(consts) - min(consts) < 1e-6 * full
    half, _ = toward_reference(w, stats, 0.5, damp=1e-9)
    assert torch.allclose(half, (w + target) / 2, atol=1e-4)       # alpha moves that share of the way
    with pytest.raises(LLMPressError, match="reference"):
        toward_reference(w, InputStats(24), 1.0)                   # no reference stream was collected


def _logit_error(model, base, tokens):
    with torch.no_grad():
        return (model(tokens).logits - base(tokens).logits).square().mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_sequential_and_reference_lower_the_error_to_the_dense_model(seed):
    base = tiny_llama(seed, layers=4)
    calib = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(seed + 10))
    held = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(seed + 100))
    plan = {n: GPTQ(bits=2, group_size=0) for n in adapter_for(base).linear_names(base)}
    errors = {}
    for key, options in {"plain": {}, "seq": {"sequential": True}, "ref": {"reference": 0.25},
                         "seq+ref": {"sequential": True, "reference": 0.25}}.items():
        model = copy.deepcopy(base)
        report = compress(model, plan, calib, progress=False, **options)
        errors[key] = (_logit_error(model, base, calib), _logit_error(model, base, held))
        if "reference" in options:
            shifts = {k: v["reference_shift"] for k, v in report.layers.items()}
            # block 0 reads the embeddings, the same in both models: nothing to correct, except
            # (sequential) in the groups after q/k/v, whose inputs come from compressed layers
            first = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
            same = [k for k in shifts if k.startswith("model.layers.0.") and (k in first or "sequential" not in options)]
            assert all((s == 0) == (k in same) for k, s in shifts.items()), shifts
    # on the calibration tokens (what the objectives see) every option helps, and together most
    assert errors["seq"][0] < errors["plain"][0] and errors["ref"][0] < errors["plain"][0]
    assert errors["seq+ref"][0] < 0.7 * errors["plain"][0]
    assert errors["seq+ref"][1] < errors["plain"][1]               # and on other tokens of the same kind


def test_sequential_changes_nothing_when_only_the_first_group_of_each_block_is_compressed(calib_tokens):
    """Nothing before q/k/v is compressed, so their statistics (from a forward stopped right after
    them) are those of the one-pass walk: the same weights, bit for bit."""
    base = tiny_llama(layers=2)
    plan = {f"model.layers.{i}.self_attn.{p}": GPTQ(bits=3, group_size=32) for i in range(2) for p in ("q_proj", "k_proj", "v_proj")}
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    compress(a, plan, calib_tokens, progress=False)
    compress(b, plan, calib_tokens, progress=False, sequential=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # but o_proj after compressed q/k/v sees other inputs than in the one-pass walk
    plan2 = {**plan, **{f"model.layers.{i}.self_attn.o_proj": GPTQ(bits=3, group_size=32) for i in range(2)}}
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    compress(a, plan2, calib_tokens, progress=False)
    compress(b, plan2, calib_tokens, progress=False, sequential=True)
    oa, ob = (m.model.layers[0].self_attn.o_proj.dense_weight() for m in (a, b))
    assert not torch.equal(oa, ob)


def test_reference_and_sequential_refuse_bad_settings(tiny_model, calib_tokens):
    plan = {n: GPTQ(bits=4) for n in adapter_for(tiny_model).linear_names(tiny_model)}
    with pytest.raises(LLMPressError, match=r"\[0, 1\]"):
        compress(tiny_model, plan, calib_tokens, reference=1.5)
    with pytest.raises(LLMPressError, match="propagate"):
        compress(tiny_model, plan, calib_tokens, reference=0.25, propagate=False)
    with pytest.raises(LLMPressError, match="propagate"):
        compress(tiny_model, plan, calib_tokens, sequential=True, propagate=False)
    from llmpress import RTN
    with pytest.raises(LLMPressError, match="Gram"):
        compress(tiny_model, {n: RTN(bits=4) for n in plan}, calib_tokens, reference=0.25)


def test_tune_lowers_each_block_error_and_keeps_the_codes(calib_tokens):
    """Block-wise tuning of scales and norms: the codes are those GPTQ chose, the block's error to
    its target went down wherever the result was kept, and a block whose error would rise is put back."""
    from llmpress.modules import QuantLinear
    base = tiny_llama(seed=3, layers=2)
    calib = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(5))
    plan = {n: GPTQ(bits=2, group_size=32) for n in adapter_for(base).linear_names(base)}
    plain, tuned = copy.deepcopy(base), copy.deepcopy(base)
    compress(plain, plan, calib, progress=False)
    report = compress(tuned, plan, calib, progress=False, tune=3)
    first = {k: m for k, m in plain.named_modules() if isinstance(m, QuantLinear)}
    for k, m in tuned.named_modules():
        if isinstance(m, QuantLinear):
            if k.startswith("model.layers.0."):       # block 0: same inputs, so the same GPTQ codes
                assert torch.equal(m.int_weight(), first[k].int_weight())
            assert m.scale.dtype == first[k].scale.dtype
    infos = [v["tune"] for v in report.layers.values()]
    assert all(i["steps"] == 3 * 2 and i["tensors"] == 7 + 2 for i in infos)
    assert all((i["mse_after"] < i["mse_before"]) == i["kept"] for i in infos) and any(i["kept"] for i in infos)
    tuned0 = tuned.model.layers[0]
    kept0 = report.layers["model.layers.0.mlp.down_proj"]["tune"]["kept"]
    changed = not torch.equal(tuned0.mlp.down_proj.scale, plain.model.layers[0].mlp.down_proj.scale)
    assert changed == kept0
    assert _logit_error(tuned, base, calib) < _logit_error(plain, base, calib)
    with pytest.raises(LLMPressError, match="propagate"):
        compress(copy.deepcopy(base), plan, calib, tune=2, propagate=False)


@pytest.mark.slow
@needs_embedded
def test_embedded_model_sequential_reference_and_tune_lower_the_error_on_other_text():
    """SmolLM2-135M cut to its first 4 blocks, GPTQ W3 g64 on them, calibrated on `wikipedia`:
    sequential + reference lower the last block's output error to the dense model's on WikiText-2
    windows (text it was not calibrated on); tune lowers it on the calibration windows it fits, but
    NOT on WikiText-2 (measured: 0.2146 vs 0.2127 without it; bench/README.md), so only that is asserted."""
    from llmpress.data import calibration_tokens, eval_tokens
    from llmpress.models import load_model
    base, tok = load_model("smollm2-135m")
    base.model.layers = base.model.layers[:4]
    base.config.num_hidden_layers = 4
    calib = calibration_tokens(tok, "wikipedia", 16, 256, seed=0)
    held = eval_tokens(tok, "wikitext2")[: 4 * 256].view(4, 256)
    plan = {n: GPTQ(bits=3, group_size=64) for n in adapter_for(base).linear_names(base)}

    def error(model, ids):
        with torch.no_grad():
            a = model.model(ids).last_hidden_state
            b = base.model(ids).last_hidden_state
        return (a - b).square().mean().item()

    errors = {}
    for key, options in {"plain": {}, "seq+ref": {"sequential": True, "reference": 0.25},
                         "seq+ref+tune": {"sequential": True, "reference": 0.25, "tune": 1}}.items():
        model = copy.deepcopy(base)
        compress(model, plan, calib, progress=False, **options)
        errors[key] = (error(model, held), error(model, calib[:4]))
    assert errors["seq+ref"][0] < errors["plain"][0]
    assert errors["seq+ref+tune"][1] < errors["seq+ref"][1]
