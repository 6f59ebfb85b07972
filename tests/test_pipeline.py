import copy

import pytest
import torch

from llmpress import LLMPressError, Magnitude, Plan, RTN, SVD, Series
from llmpress.arch import adapter_for
from llmpress.eval import model_size
from llmpress.export import load_compressed, save_compressed, verify
from llmpress.pipeline import compress

CONFIGS = [RTN(bits=4, group_size=48), RTN(bits=3, group_size=128, symmetric=False),
           Magnitude(sparsity=0.5), Magnitude(sparsity=None, nm="2:4"), SVD(param_ratio=0.5),
           Series(bits=2, terms=2, group_size=32)]


def _resolve(model, plan):
    return plan.resolve(adapter_for(model).linear_names(model))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_compress_save_load_identical_logits_and_smaller(tiny_model, config, tmp_path):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    dense_logits = tiny_model(ids).logits
    dense_size = model_size(tiny_model)
    compress(tiny_model, _resolve(tiny_model, Plan.uniform(config)), progress=False)
    logits = tiny_model(ids).logits
    assert not torch.allclose(logits, dense_logits)                # the method changed the model
    size = model_size(tiny_model)
    assert size["bytes"] < dense_size["bytes"] and size["params"] == dense_size["params"]

    out = save_compressed(tiny_model, None, tmp_path / "out", {"plan": None})
    reloaded, _ = load_compressed(out, runtime="rebuild")
    assert torch.equal(reloaded(ids).logits, logits)
    assert model_size(reloaded) == size
    # stored bytes on disk cover the reported size (plus embeddings, norms, header)
    assert (out / "llmpress.safetensors").stat().st_size >= size["bytes"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no temporary left behind


def test_identity_plan_leaves_logits_bit_identical(tiny_model, calib_tokens):
    ids = calib_tokens[:2]
    before = tiny_model(ids).logits
    layer_configs = _resolve(tiny_model, Plan([("*", None)]))
    assert layer_configs == {}
    compress(tiny_model, layer_configs, progress=False)
    assert torch.equal(tiny_model(ids).logits, before)


def test_mixed_plan_applies_each_rule(tiny_model):
    plan = Plan([("*.mlp.*", Magnitude(sparsity=None, nm="2:4")), ("*.o_proj", None), ("*", RTN(bits=8))])
    report = compress(tiny_model, _resolve(tiny_model, plan), progress=False)
    names = type(tiny_model.model.layers[0].mlp.down_proj).__name__, type(tiny_model.model.layers[1].self_attn.q_proj).__name__
    assert names == ("SparseLinear", "QuantLinear")
    assert isinstance(tiny_model.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    assert len(report.layers) == 2 * 6


def test_nan_weights_refused_before_work(tiny_model):
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    first = tiny_model.model.layers[0].self_attn.q_proj
    with pytest.raises(LLMPressError, match="NaN"):
        compress(tiny_model, _resolve(tiny_model, Plan.uniform(RTN())), progress=False)
    assert tiny_model.model.layers[0].self_attn.q_proj is first        # nothing was touched


def test_a_method_that_changes_nothing_is_caught(tiny_model, monkeypatch):
    from llmpress import config as config_mod
    from llmpress.modules import SparseLinear

    def noop(linear, config, stats):   # "prunes" nothing and keeps every weight exactly
        w = linear.weight.detach().float()
        w16 = w.half().float()
        with torch.no_grad():
            linear.weight.copy_(w16)
        return SparseLinear.from_dense(w16, torch.ones_like(w16, dtype=torch.bool)), {}

    monkeypatch.setitem(config_mod._REGISTRY, "magnitude", (Magnitude, noop))
    with pytest.raises(LLMPressError, match="unchanged"):
        compress(tiny_model, _resolve(tiny_model, Plan.uniform(Magnitude(sparsity=0.5))), progress=False)


def test_calibration_stats_are_collected_per_input_group(tiny_model, calib_tokens):
    """The pipeline hands calibrated methods the Gram matrix of the layer's real inputs."""
    from llmpress.pipeline import _heads
    from llmpress.walk import BlockWalk
    walk = BlockWalk(tiny_model, batch_size=3, progress=False)
    blocks = walk.blocks
    hidden = walk.capture(calib_tokens)
    assert hidden.shape == (8, 32, 64)

    class NeedsH(RTN):
        stat = "hessian"
    todo = {f"model.layers.0.{n}": NeedsH() for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    walk.batch_size = 4
    _, stats = walk.collect(blocks[0], hidden, _heads(walk.adapter, "model.layers.0.", todo, False))
    assert stats["self_attn.q_proj"] is stats["self_attn.v_proj"]       # shared input, one statistic
    assert "mlp.gate_proj" not in stats                                   # not asked for
    seen = []
    h = blocks[0].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 128)))
    with torch.inference_mode():
        blocks[0](hidden, **walk.kwargs)
    h.remove()
    x = torch.cat(seen)
    assert stats["mlp.down_proj"].count == x.shape[0]
    assert torch.allclose(stats["mlp.down_proj"].hessian(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_corrupt_file_is_detected(tiny_model, tmp_path):
    compress(tiny_model, _resolve(tiny_model, Plan.uniform(RTN())), progress=False)
    out = save_compressed(tiny_model, None, tmp_path / "out", {})
    verify(out)
    data = bytearray((out / "llmpress.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "llmpress.safetensors").write_bytes(bytes(data))
    with pytest.raises(LLMPressError, match="corrupt"):
        load_compressed(out, runtime="rebuild")


def test_existing_output_refused_without_overwrite(tiny_model, tmp_path):
    out = save_compressed(copy.deepcopy(tiny_model), None, tmp_path / "out", {})
    with pytest.raises(LLMPressError, match="already exists"):
        save_compressed(tiny_model, None, out, {})
    save_compressed(tiny_model, None, out, {}, overwrite=True)
    verify(out)


def test_one_pass_statistics_are_cached_and_reused(tiny_model, calib_tokens, tmp_path, monkeypatch):
    from llmpress import GPTQ, SparseGPT
    from llmpress import pipeline
    reference = copy.deepcopy(tiny_model)
    plan = Plan.uniform(GPTQ(bits=4, group_size=32))
    first = copy.deepcopy(reference)
    compress(first, _resolve(first, plan), calib_tokens, progress=False, propagate=False, stats_cache=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2          # one file per block

    def no_forward(*a, **k):
        raise AssertionError("calibration forward ran despite a full cache")
    monkeypatch.setattr(pipeline.BlockWalk, "capture", no_forward)
    second = copy.deepcopy(reference)
    compress(second, _resolve(second, plan), calib_tokens, progress=False, propagate=False, stats_cache=tmp_path / "c")
    ids = calib_tokens[:2]
    assert torch.equal(first(ids).logits, second(ids).logits)
    # another method family reuses the same statistics
    third = copy.deepcopy(reference)
    compress(third, _resolve(third, Plan.uniform(SparseGPT(sparsity=0.5))), calib_tokens, progress=False,
             propagate=False, stats_cache=tmp_path / "c")
    monkeypatch.undo()
    # other tokens: a different key, so the cache is not used
    other = copy.deepcopy(reference)
    compress(other, _resolve(other, plan), calib_tokens.flip(0)[:, :16], progress=False, propagate=False,
             stats_cache=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 4


def test_cache_key_is_verified(tiny_model, calib_tokens, tmp_path):
    from llmpress.stats import InputStats, StatsCache
    cache = StatsCache(tmp_path)
    s = InputStats(4)
    s.add(torch.randn(3, 4))
    cache.save("a" * 64, {"x": s})
    cache.path("a" * 64).rename(cache.path("b" * 64))                  # a stale / renamed file
    with pytest.raises(LLMPressError, match="key mismatch"):
        cache.load("b" * 64)
    loaded = StatsCache(tmp_path)
    cache.save("c" * 64, {"x": s})
    got = loaded.load("c" * 64)["x"]
    assert torch.equal(got.gram, s.gram) and got.count == 3


def test_one_pass_differs_from_propagated_but_both_work(tiny_model, calib_tokens):
    from llmpress import GPTQ
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    plan = Plan.uniform(GPTQ(bits=3, group_size=32))
    compress(a, _resolve(a, plan), calib_tokens, progress=False)
    compress(b, _resolve(b, plan), calib_tokens, progress=False, propagate=False)
    # block 0 sees the same inputs either way; block 1 does not
    assert torch.equal(a.model.layers[0].mlp.down_proj.qweight, b.model.layers[0].mlp.down_proj.qweight)
    assert not torch.equal(a.model.layers[1].mlp.down_proj.qweight, b.model.layers[1].mlp.down_proj.qweight)


def test_plain_transformers_refuses_a_native_folder(tiny_model, tmp_path):
    """Never silently wrong: without llmpress, the compressed layers would load as random weights."""
    from transformers import AutoModelForCausalLM
    compress(tiny_model, _resolve(tiny_model, Plan.uniform(RTN())), progress=False)
    out = save_compressed(tiny_model, None, tmp_path / "out", {})
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)
    load_compressed(out, runtime="rebuild")                                    # llmpress itself reads it


def test_save_hf_folder_round_trips_for_offload(tiny_model, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM
    from llmpress.offload import save_hf_folder
    path = save_hf_folder(tiny_model, tiny_tokenizer, tmp_path / "hf", max_shard_bytes=50_000)
    assert len(list(path.glob("model-*.safetensors"))) > 2 and (path / "model.safetensors.index.json").is_file()
    again = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(again(ids).logits, tiny_model(ids).logits)
    with pytest.raises(LLMPressError, match="already exists"):
        save_hf_folder(tiny_model, tiny_tokenizer, path)


def test_weights_already_on_the_grid_are_a_lossless_result_not_a_bug(tiny_model, calib_tokens):
    """A model whose weights lie on a Q4_1 grid (as the embedded model's do) quantized onto the finer
    Q5_1 grid with llama.cpp's scale search (which finds that grid): every layer's weights come
    back exactly; that is recorded as lossless, not refused."""
    from llmpress.methods import ggml_grid
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    names = adapter_for(model).linear_names(model)
    with torch.no_grad():
        for n in names:
            lin = model.get_submodule(n)
            lin.weight.copy_(ggml_grid.round_to_grid(lin.weight.detach().float(), ggml_grid.TYPES["q4_1"])[1])
    report = compress(model, _resolve(model, Plan.uniform(RTN(gguf="q5_1", clip="search"))), progress=False)
    assert all(report.layers[n].get("lossless") for n in names)


@pytest.mark.parametrize("sequential", [False, True])
def test_propagation_builds_each_compressed_weight_once_per_pass_and_changes_nothing(monkeypatch, sequential):
    """A block's outputs are propagated over 8 batches: each compressed layer's dense weight is
    built once for them (not once per batch), and the compressed model is bit for bit what
    rebuilding it per batch gives."""
    import collections
    import contextlib
    from conftest import tiny_llama
    from llmpress import GPTQ
    from llmpress import pipeline as pipeline_mod
    from llmpress.modules import QuantLinear
    tokens = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    calls = collections.Counter()
    real = QuantLinear.dense_weight
    monkeypatch.setattr(QuantLinear, "dense_weight", lambda self: (calls.update([id(self)]), real(self))[1])
    results = []
    for keep in (True, False):
        if not keep:
            monkeypatch.setattr(pipeline_mod, "dense_weights_kept", lambda block: contextlib.nullcontext())
        model = tiny_llama(layers=3)
        calls.clear()
        compress(model, _resolve(model, Plan.uniform(GPTQ(bits=4, group_size=32))), tokens, batch_size=2,
                 progress=False, sequential=sequential)
        results.append((model.state_dict(), max(calls.values())))
    (kept, most_kept), (rebuilt, most_rebuilt) = results
    assert most_rebuilt >= 9 and most_kept <= (5 if sequential else 2)
    assert kept.keys() == rebuilt.keys() and all(torch.equal(kept[k], rebuilt[k]) for k in kept)
