"""Runtimes of compressed layers (llmpress.modules.RUNTIMES): "rebuild" (compression's own),
"fast" (what a loaded model runs: packed kernels under float32 activations too, a dense weight
kept where no kernel exists) and "dense" (the dense export's numerics)."""
import pytest
import torch

from llmpress import LLMPressError
from llmpress.config import handler_for
from llmpress.modules import set_runtime


def _layer(config, out=96, inp=128, seed=0):
    from llmpress.stats import InputStats
    torch.manual_seed(seed)
    stats = InputStats(inp)
    stats.add(torch.randn(512, inp))
    return handler_for(config)(torch.nn.Linear(inp, out, bias=True), config, stats)[0]


def _count_rebuilds(module) -> list:
    """Count dense_weight calls on this instance (the call still rebuilds the weight)."""
    calls, rebuild = [], module.dense_weight
    module.dense_weight = lambda: (calls.append(1), rebuild())[1]
    return calls


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 4096)])
def test_fast_runs_float32_activations_through_the_packed_kernels(bits, group):
    from llmpress import RTN
    q = _layer(RTN(bits=bits, group_size=group))
    x = torch.randn(3, 5, 128)
    ref = torch.nn.functional.linear(x, q.dense_weight(), q.bias.float())
    assert not q.runs_packed(x)                                  # "rebuild": float32 rebuilds the weight
    set_runtime(q, "fast")
    assert q.runs_packed(x)
    calls = _count_rebuilds(q)
    y = q(x)
    assert not calls and q._weight_cache is None and q._packed is not None     # no dense weight, ever
    assert y.dtype == torch.float32 and y.shape == (3, 5, 96)
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()        # bf16 rounding of the activations only
    assert not torch.equal(y, ref)                               # it did take the bf16 kernel


@pytest.mark.parametrize("runtime", ["fast", "dense"])
def test_layers_without_a_kernel_keep_their_weight_and_the_exact_numbers(runtime):
    from llmpress import RTN, GPTQLUT
    for config in (RTN(bits=3, group_size=32), GPTQLUT(bits=3)):
        m = _layer(config)
        x = torch.randn(4, 128)
        exact = m(x)                                             # "rebuild"
        set_runtime(m, runtime)
        calls = _count_rebuilds(m)
        for _ in range(3):
            assert torch.equal(m(x), exact)
        assert len(calls) == 1 and m._weight_cache.dtype == torch.float32
        y16 = m(x.to(torch.bfloat16))                            # another dtype: kept again in that dtype
        assert m._weight_cache.dtype == torch.bfloat16 and len(calls) == 2
        assert torch.equal(y16, torch.nn.functional.linear(x.to(torch.bfloat16), m.dense_weight().to(torch.bfloat16),
                                                           m.bias.to(torch.bfloat16)))


def test_dense_runtime_never_takes_a_kernel_and_set_runtime_drops_kept_forms():
    from llmpress import RTN
    q = _layer(RTN(bits=4, group_size=32))
    xb = torch.randn(2, 128).to(torch.bfloat16)
    q(xb)
    assert q._packed is not None                                  # bf16 under "rebuild": the kernel
    set_runtime(q, "dense")
    assert q._packed is None and not q.runs_packed(xb)
    y = q(xb)
    assert torch.equal(y, torch.nn.functional.linear(xb, q.dense_weight().to(torch.bfloat16), q.bias.to(torch.bfloat16)))
    set_runtime(q, "rebuild")
    assert q._weight_cache is None
    with pytest.raises(LLMPressError, match="unknown runtime"):
        set_runtime(q, "turbo")


def test_composites_under_fast_take_one_dense_matmul_when_their_quantized_part_has_no_kernel():
    from llmpress import GPTQLowRank, Series
    torch.manual_seed(0)
    x = torch.randn(4, 128)
    # 3-bit base: no kernel -> the whole layer's weight kept, one matmul, exact numbers
    m = _layer(GPTQLowRank(bits=3, group_size=32, rank=8))
    exact = m(x)
    set_runtime(m, "fast")
    assert torch.allclose(m(x), exact, atol=1e-5) and m._weight_cache is not None and m.quant._weight_cache is None
    # 4-bit g32 terms: every term on the kernel, no dense weight anywhere
    s = _layer(Series(bits=4, terms=2, group_size=32))
    ref = s(x)
    set_runtime(s, "fast")
    y = s(x)
    assert s._weight_cache is None and all(t._packed is not None for t in s.terms)
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


def test_a_loaded_model_runs_fast_by_default_and_exactly_when_asked(tiny_model, tmp_path):
    from llmpress import GPTQ, Plan
    from llmpress.arch import adapter_for
    from llmpress.export import load_compressed, save_compressed
    from llmpress.modules import CompressedLinear
    from llmpress.pipeline import compress
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    compress(tiny_model, Plan.uniform(GPTQ(bits=4, group_size=32)).resolve(adapter_for(tiny_model).linear_names(tiny_model)),
             calib, progress=False)
    ids = calib[:2, :24]
    logits = tiny_model(ids).logits
    out = save_compressed(tiny_model, None, tmp_path / "out", {"plan": None})
    fast, _ = load_compressed(out)
    layers = [m for m in fast.modules() if isinstance(m, CompressedLinear)]
    assert layers and all(m.runtime == "fast" for m in layers)
    y = fast(ids).logits
    assert all(m._packed is not None and m._weight_cache is None for m in layers)   # 64-wide rows, g32: all packed
    assert (y - logits).abs().max() < 0.05 * logits.abs().max() and not torch.equal(y, logits)
    for runtime in ("rebuild", "dense"):
        exact, _ = load_compressed(out, runtime=runtime)
        assert torch.equal(exact(ids).logits, logits)
    with pytest.raises(LLMPressError, match="unknown runtime"):
        load_compressed(out, runtime="turbo")


def test_eval_records_its_runtimes(tiny_model, tmp_path, capsys):
    import json
    from llmpress import RTN, Plan
    from llmpress.arch import adapter_for
    from llmpress.cli import main
    from llmpress.export import save_compressed
    from llmpress.pipeline import compress
    from conftest import bpe_tokenizer
    compress(tiny_model, Plan.uniform(RTN(bits=4, group_size=32)).resolve(adapter_for(tiny_model).linear_names(tiny_model)),
             None, progress=False)
    out = save_compressed(tiny_model, bpe_tokenizer(256), tmp_path / "out", {"plan": None})
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    runs = {}
    for extra in ([], ["--runtime", "rebuild"]):
        js = tmp_path / f"e{len(extra)}.json"
        assert main(["eval", "--model", str(out), "--dataset", str(text), "--seq-len", "32", "--max-windows", "2",
                     "--json", str(js), *extra]) == 0
        runs[tuple(extra)] = json.loads(js.read_text())
    assert runs[()]["runtime"] == {"quality": "dense"}
    assert runs[("--runtime", "rebuild")]["runtime"] == {"quality": "rebuild"}
    assert runs[()]["perplexity"] == runs[("--runtime", "rebuild")]["perplexity"]      # float32: the same numbers


def test_kept_dense_weights_skip_layers_that_run_a_packed_kernel():
    """Propagating a bfloat16 block: its 4-bit g32 layer runs torch's int4 kernel, so keeping a
    dense weight for it would only cost a rebuild and memory; a 3-bit layer (no kernel) keeps one.
    Under float32 ("rebuild": no kernel) both keep theirs."""
    from llmpress import RTN
    from llmpress.modules import dense_weights_kept
    block = torch.nn.Sequential(_layer(RTN(bits=4, group_size=32)), torch.nn.LayerNorm(96),
                                _layer(RTN(bits=3, group_size=32), out=128, inp=96))
    for dtype, kept in ((torch.bfloat16, [False, True]), (torch.float32, [True, True])):
        block.to(dtype)
        x = torch.randn(2, 128, dtype=dtype)
        expect = block(x)
        with dense_weights_kept(block):
            assert [block[k]._weight_cache is not None for k in (0, 2)] == kept, dtype
            assert torch.equal(block(x), expect)
        assert block[0]._weight_cache is None and block[2]._weight_cache is None
