"""Issue 13: the online Hadamard on a linear's input (QuaRot's R4), as a runtime op that every
layer type, save -> load, the allocator and the exports carry."""
import copy

import pytest
import torch

from conftest import assert_keeps_embedded_logits, needs_embedded, tiny_llama
from llmpress.methods.lut import layer_error
from llmpress import AWQ, GPTQ, RTN, Plan
from llmpress.arch import adapter_for
from llmpress.config import handler_for
from llmpress.errors import LLMPressError
from llmpress.modules import QuantLinear
from llmpress.pipeline import compress
from llmpress.rotate import (OnlineHadamard, fold_online, online_rotation_of, rotate_model, rotate_online,
                             rotation_matrix)
from llmpress.walk import dense_statistics

DOWN = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("n", [8, 64, 192, 576, 1536])
def test_online_hadamard_is_its_orthogonal_matrix(n):
    r = OnlineHadamard(n, seed=3)
    big = r.matrix()
    torch.testing.assert_close(big @ big.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(2, 5, n)
    torch.testing.assert_close(r(x), (x.double() @ big).float(), rtol=1e-5, atol=1e-5)
    assert r.shape[1] <= 36                        # the small Kronecker factor: 1536 = 128 x 12, 576 = 16 x 36
    assert not r.state_dict()                      # nothing stored: rebuilt from (n, seed)
    xb = x.to(torch.bfloat16)                      # half-precision inputs: rotated in float32, rounded once
    assert r(xb).dtype == torch.bfloat16
    torch.testing.assert_close(r(xb), (xb.double() @ big).to(torch.bfloat16), rtol=0, atol=0.02)
    cast = copy.deepcopy(r).to(torch.bfloat16)     # a model cast to bf16 keeps the rotation exact (+-1 buffers)
    torch.testing.assert_close(cast(x), r(x), rtol=0, atol=0)
    assert not torch.equal(big, OnlineHadamard(n, seed=4).matrix())


def test_rotate_online_keeps_logits_and_compresses_in_the_rotated_basis(calib_tokens):
    model = tiny_llama()
    ids = calib_tokens[:2]
    ref = model(ids).logits
    w0 = model.get_submodule(DOWN).weight.detach().clone()
    info = rotate_online(model, ["mlp.down_proj", "self_attn.o_proj"], seed=1)
    assert info["layers"] == ["mlp.down_proj", "self_attn.o_proj"]
    down = model.get_submodule(DOWN)
    assert not torch.allclose(down.weight, w0, atol=1e-3)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    # the statistics see the rotated input: the Gram matrix is R^T G R
    plain = dense_statistics(tiny_llama(), calib_tokens)[DOWN].hessian().double()
    r = online_rotation_of(down).matrix()
    got = dense_statistics(model, calib_tokens)[DOWN].hessian().double()
    torch.testing.assert_close(got, r.T @ plain @ r, rtol=1e-3, atol=1e-4)

    names = adapter_for(model).linear_names(model)
    plan = {n: RTN(bits=4, group_size=32) for n in names if "down_proj" in n}       # the rest stays dense
    compress(model, plan, calib_tokens, progress=False)
    q = model.get_submodule(DOWN)
    assert isinstance(q, QuantLinear) and online_rotation_of(q) is not None
    # on the grid in the rotated basis (its own RTN of W R), not of W
    direct = RTN(bits=4, group_size=32)
    lin = torch.nn.Linear(down.in_features, down.out_features, bias=False)
    lin.weight.data = (w0.double() @ r).float()
    torch.testing.assert_close(q.dense_weight(), handler_for(direct)(lin, direct, None)[0].dense_weight())
    # layers left dense got their rotation folded back
    o = model.get_submodule("model.layers.0.self_attn.o_proj")
    assert isinstance(o, torch.nn.Linear) and online_rotation_of(o) is None
    err = (model(ids).logits - ref).abs().max()
    assert 0 < err < 0.5 * ref.abs().max()


def test_online_rotation_lowers_the_quantization_error_of_a_coherent_layer():
    """A layer whose weight has outlier columns (as down_proj has): 3-bit per channel GPTQ on W R
    gives a smaller output error than on W, measured in the original basis."""
    from llmpress.methods.gptq import gptq_solve
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[:, ::16] *= 8
    x = torch.randn(4096, 128, generator=g)
    h = x.T @ x / x.shape[0]
    r = OnlineHadamard(128, 0).matrix().float()

    def error(wq, basis):
        return layer_error(w, h, wq @ basis.T if basis is not None else wq)

    def deq(q, s, z):
        return (q - z) * s

    plain = error(deq(*gptq_solve(w, h, 3, 0, False, act_order=True)[:3]), None)
    rotated = error(deq(*gptq_solve(w @ r, r.T @ h @ r, 3, 0, False, act_order=True)[:3]), r)
    assert rotated < 0.7 * plain


def test_online_rotation_survives_save_load_and_exports(tmp_path, calib_tokens, tiny_tokenizer):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from llmpress.export import load_compressed, read_manifest, save_compressed
    from llmpress.formats import export_compressed_tensors, export_dense
    model = tiny_llama()
    rotate_model(model, "hadamard")
    rotate_online(model, ["mlp.down_proj"])
    names = adapter_for(model).linear_names(model)
    compress(model, Plan.uniform(GPTQ(bits=4, group_size=32)).resolve(names), calib_tokens, progress=False)
    ids = calib_tokens[:2]
    ref = model(ids).logits
    save_compressed(model, tiny_tokenizer, tmp_path / "native", {})
    assert read_manifest(tmp_path / "native")["modules"][DOWN]["online_rotation"] == {"n": 128, "seed": 0}
    back, _ = load_compressed(tmp_path / "native", runtime="rebuild")
    assert online_rotation_of(back.get_submodule(DOWN)) is not None
    assert torch.equal(back(ids).logits, ref)
    # compressed-tensors: the rotated layers go dense (folded), the others stay packed
    out = export_compressed_tensors(copy.deepcopy(model), tiny_tokenizer, tmp_path / "ct")
    ct = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(ct(ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert isinstance(ct.get_submodule(DOWN), torch.nn.Linear)
    dense = AutoModelForCausalLM.from_pretrained(export_dense(copy.deepcopy(model), tiny_tokenizer, tmp_path / "d"))
    torch.testing.assert_close(dense(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_fold_online_restores_the_dense_weight():
    model = tiny_llama()
    w0 = model.get_submodule(DOWN).weight.detach().clone()
    rotate_online(model, ["mlp.down_proj"], seed=2)
    assert fold_online(model) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    torch.testing.assert_close(model.get_submodule(DOWN).weight, w0, rtol=0, atol=1e-5)
    assert online_rotation_of(model.get_submodule(DOWN)) is None
    x = torch.randn(3, 128)
    torch.testing.assert_close(model.get_submodule(DOWN)(x), x @ w0.T)      # the hook is gone too


def test_online_rotation_refuses_bad_input(calib_tokens):
    model = tiny_llama()
    with pytest.raises(LLMPressError, match="not linears of a block"):
        rotate_online(model, ["mlp.nope"])
    with pytest.raises(LLMPressError, match="no layers"):
        rotate_online(model, [])
    rotate_online(model, ["mlp.down_proj"])
    with pytest.raises(LLMPressError, match="already"):
        rotate_online(model, ["mlp.down_proj"])


def test_awq_does_not_fold_scales_across_an_online_rotation(calib_tokens):
    model = tiny_llama()
    rotate_online(model, ["mlp.down_proj"])
    up0 = model.get_submodule("model.layers.0.mlp.up_proj").weight.detach().clone()
    names = adapter_for(model).linear_names(model)
    report = compress(model, {n: AWQ(bits=4, group_size=32) for n in names if "down_proj" in n}, calib_tokens,
                      progress=False)
    assert torch.equal(model.get_submodule("model.layers.0.mlp.up_proj").weight, up0)
    assert "nothing to fold" in report.layers[DOWN].get("awq", "")


def test_cli_online_hadamard(tmp_path, tiny_hf_dir, capsys):
    from llmpress.cli import main
    from llmpress.export import load_compressed, read_manifest
    out = tmp_path / "out"
    main(["compress", "--model", str(tiny_hf_dir), "--method", "gptq", "--bits", "3", "--rotate", "hadamard",
          "--online-hadamard", "down_proj", "--calib", str(tiny_hf_dir / "config.json"), "--num-samples", "4",
          "--seq-len", "16", "--out", str(out)])
    assert read_manifest(out)["rotation"]["online"]["layers"] == ["mlp.down_proj"]
    model, _ = load_compressed(out, runtime="rebuild")
    assert online_rotation_of(model.get_submodule(DOWN)) is not None
    code = main(["compress", "--model", str(tiny_hf_dir), "--method", "rtn", "--bits", "4",
                 "--online-hadamard", "gate", "--out", str(tmp_path / "x")])
    assert code == 2 and "'gate' matches no block linear" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@needs_embedded
def test_online_rotation_keeps_embedded_model_logits_and_lowers_down_proj_error():
    from llmpress.data import calibration_tokens
    from llmpress.methods.gptq import gptq_solve
    from llmpress.models import load_model
    model, tok = load_model("smollm2-135m")
    rotate_model(model, "hadamard")
    plain = copy.deepcopy(model)
    assert_keeps_embedded_logits(model, tok, lambda m: rotate_online(m, ["mlp.down_proj", "self_attn.o_proj"]))
    # the last block's down_proj (the largest gain measured: 0.62x with 32 x 512 tokens; the unit
    # test above checks that the statistics of a rotated layer are R^T H R, so H is measured once)
    tokens = calibration_tokens(tok, "wikipedia", 32, 512, seed=0)
    name = "model.layers.29.mlp.down_proj"
    h = dense_statistics(plain, tokens)[name].hessian().double()
    r = online_rotation_of(model.get_submodule(name)).matrix()
    errors = []
    for w, hh in ((plain.get_submodule(name).weight.double(), h),
                  (model.get_submodule(name).weight.double(), r.T @ h @ r)):
        q, s, z, _ = gptq_solve(w.float(), hh.float(), 3, 0, False, act_order=True, clip="mse")
        errors.append(layer_error(w, hh, (q - z) * s))
    assert errors[1] < 0.8 * errors[0]
