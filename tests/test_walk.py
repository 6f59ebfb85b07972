"""The block walk on any device and dtype, the offloaded (larger than memory) path, and the bad
inputs that must fail before heavy work."""
import copy
import json

import pytest
import torch

from llmpress import GPTQ, Plan, SparseGPT
from llmpress.arch import adapter_for
from llmpress.cli import main
from llmpress.modules import CompressedLinear
from llmpress.pipeline import compress


def _resolve(model, plan):
    return plan.resolve(adapter_for(model).linear_names(model))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return p


def test_no_dense_copy_is_kept_after_compression(tiny_model, calib_tokens):
    compress(tiny_model, _resolve(tiny_model, Plan.uniform(GPTQ(bits=4, group_size=32))), calib_tokens, progress=False)
    layers = [m for m in tiny_model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 14 and all(m._weight_cache is None for m in layers)
    tiny_model(calib_tokens[:1])                                   # a forward builds no cache either
    assert all(m._weight_cache is None for m in layers)


def test_bfloat16_compression_matches_float32(tiny_model, calib_tokens):
    """The walk in bf16: statistics still accumulate in float32, the solves see the same inputs up
    to bf16 rounding, so the two compressed models agree closely."""
    plan = Plan.uniform(GPTQ(bits=4, group_size=32))
    f32 = copy.deepcopy(tiny_model)
    b16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    compress(f32, _resolve(f32, plan), calib_tokens, progress=False)
    compress(b16, _resolve(b16, plan), calib_tokens, progress=False)
    q = b16.model.layers[1].mlp.down_proj
    assert q.scale.dtype == torch.float16 and b16.model.layers[1].input_layernorm.weight.dtype == torch.bfloat16
    # the integer codes mostly agree (bf16 weights and inputs move some rounding decisions)
    agree = (f32.model.layers[1].mlp.down_proj.int_weight() == q.int_weight()).float().mean()
    assert agree > 0.8
    ref = tiny_model(calib_tokens).logits
    err32 = (f32(calib_tokens).logits - ref).square().mean()
    err16 = (b16(calib_tokens).logits.float() - ref).square().mean()
    assert err16 < 1.5 * err32 + 1e-4


def test_explicit_cpu_device_gives_identical_results(tiny_model, calib_tokens):
    plan = Plan.uniform(SparseGPT(sparsity=0.5))
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    compress(a, _resolve(a, plan), calib_tokens, progress=False)
    rep = compress(b, _resolve(b, plan), calib_tokens, progress=False, device="auto" if not torch.cuda.is_available() else "cpu")
    assert rep.device == "cpu"
    assert torch.equal(a(calib_tokens).logits, b(calib_tokens).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_results_equal_cpu_results(tiny_model, calib_tokens):
    """Each block and its solve on the GPU, weights back on the CPU afterwards; equal to the CPU
    run up to floating-point tolerance (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    plan = Plan.uniform(GPTQ(bits=4, group_size=32))
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    compress(a, _resolve(a, plan), calib_tokens, progress=False)
    compress(b, _resolve(b, plan), calib_tokens, progress=False, device="cuda")
    assert all(t.device.type == "cpu" for t in b.state_dict().values())
    la, lb = a(calib_tokens).logits, b(calib_tokens).logits
    assert torch.allclose(la, lb, atol=1e-3, rtol=1e-3)


def _sharded(tmp_path, tiny_tokenizer, layers=6):
    from conftest import tiny_llama
    model = tiny_llama(layers=layers)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2
    return model, path


def test_offloaded_compression_equals_in_memory_and_holds_one_block(tmp_path, tiny_tokenizer, calib_tokens):
    from llmpress.offload import load_skeleton
    dense, path = _sharded(tmp_path, tiny_tokenizer)
    plan = Plan.uniform(GPTQ(bits=4, group_size=32))
    in_memory = copy.deepcopy(dense)
    compress(in_memory, _resolve(in_memory, plan), calib_tokens, progress=False)

    model, _, source = load_skeleton(path, tmp_path / "scratch", torch.float32)
    blocks = adapter_for(model).blocks(model)
    assert all(p.is_meta for p in blocks.parameters())
    compress(model, _resolve(model, plan), calib_tokens, progress=False, source=source)
    assert torch.equal(model(calib_tokens).logits, in_memory(calib_tokens).logits)
    assert len(list((tmp_path / "scratch").glob("block-*.safetensors"))) == 6
    # resident weights during the walk: everything outside the blocks, one dense block, and the
    # compressed blocks read back at the end -- never the whole dense model
    per_block = sum(p.numel() * 4 for p in dense.model.layers[0].parameters())
    outside = sum(p.numel() * 4 for n, p in dense.named_parameters() if ".layers." not in n)
    full = sum(p.numel() * 4 for p in dense.parameters())
    compressed_blocks = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if ".layers." in n)
    assert source.peak_resident_bytes <= outside + per_block + compressed_blocks
    assert source.peak_resident_bytes < 0.6 * full


def test_cli_offload_writes_the_same_model(tmp_path, tiny_tokenizer, text_file, capsys):
    _, path = _sharded(tmp_path, tiny_tokenizer, layers=3)
    outs = {}
    for mode in ("memory", "offload"):
        extra = ["--offload", tmp_path / "scratch"] if mode == "offload" else []
        out = tmp_path / mode
        code, _, err = _run(capsys, "compress", "--model", path, "--method", "gptq", "--bits", "4", "--group-size", "32",
                            "--calib", text_file, "--num-samples", "4", "--seq-len", "32", "--out", out, *extra)
        assert code == 0, err
        outs[mode] = (out / "llmpress.safetensors").read_bytes()
    assert outs["memory"] == outs["offload"]


def test_offload_folder_that_is_not_writable(tmp_path, tiny_tokenizer, text_file, capsys):
    _, path = _sharded(tmp_path, tiny_tokenizer, layers=2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "compress", "--model", path, "--method", "rtn", "--out", tmp_path / "o",
                        "--offload", blocker / "sub")
    assert code == 2 and "not writable" in err


def test_eval_bad_windows_and_context(tiny_hf_dir, text_file, capsys):
    code, _, err = _run(capsys, "eval", "--model", tiny_hf_dir, "--dataset", text_file, "--max-windows", "0")
    assert code == 2 and "--max-windows must be at least 1" in err
    code, _, err = _run(capsys, "eval", "--model", tiny_hf_dir, "--dataset", text_file, "--seq-len", "100000")
    assert code == 2 and "exceeds the model's context of 256" in err


def test_infeasible_budget_is_refused_before_calibration(tiny_hf_dir, text_file, capsys, monkeypatch):
    from llmpress import data

    def no_calibration(*a, **k):
        raise AssertionError("calibration text read for an infeasible budget")
    monkeypatch.setattr(data, "calibration_tokens", no_calibration)
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--budget", "bits=1", "--calib", text_file,
                        "--out", "/nonexistent/never")
    assert code == 2 and "below what the menu can reach" in err and "bits=" in err


def test_a_file_named_gguf_that_is_not_one(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf at all" * 10)
    code, _, err = _run(capsys, "eval", "--model", fake)
    assert code == 2 and "not a GGUF file" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_and_unknown_devices(tiny_hf_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--method", "rtn", "--out", tmp_path / "o",
                        "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err
    code, _, err = _run(capsys, "eval", "--model", tiny_hf_dir, "--device", "tpu")
    assert code == 2 and "device" in err


def test_compress_in_bfloat16_from_the_cli(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "b16"
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--method", "rtn", "--dtype", "bfloat16",
                        "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "llmpress.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    from llmpress.models import load_model
    model, _ = load_model(str(out), dtype=None, runtime="rebuild")            # the dtype it was saved in
    assert model.dtype == torch.bfloat16
    assert load_model(str(out), runtime="rebuild")[0].dtype == torch.float32  # or cast on request
