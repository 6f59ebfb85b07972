"""ApiQ (block-wise adapter fit), the saliency term, and end-to-end adapter recovery."""
import copy

import pytest
import torch

from llmpress import Plan
from llmpress.arch import adapter_for
from llmpress.errors import LLMPressError
from llmpress.methods.qlr import ApiQ, GPTQLowRank
from llmpress.modules import QuantLowRankLinear
from llmpress.pipeline import compress
from llmpress.recover import fisher_diagonal, train_adapters


def _compressed(base, config, calib):
    model = copy.deepcopy(base)
    report = compress(model, Plan.uniform(config).resolve(adapter_for(model).linear_names(model)), calib, progress=False)
    return model, report


def _logit_error(model, base, ids):
    with torch.no_grad():
        return (model(ids).logits - base(ids).logits).square().mean().item()


@pytest.fixture
def calib16():
    return torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))


def test_apiq_block_fit_beats_zero_init(tiny_model, calib16):
    """ApiQ's defining property: the fitted adapters preserve the dense outputs better than QLoRA's
    zero-init adapters on the same GPTQ base (the base codes do not move)."""
    zero, _ = _compressed(tiny_model, ApiQ(bits=2, group_size=32, rank=4, epochs=0), calib16)
    fit, report = _compressed(tiny_model, ApiQ(bits=2, group_size=32, rank=4, epochs=3), calib16)
    name = "model.layers.0.self_attn.q_proj"
    a, b = zero.get_submodule(name), fit.get_submodule(name)
    assert isinstance(b, QuantLowRankLinear)
    assert torch.count_nonzero(a.up) == 0 and torch.count_nonzero(b.up) > 0      # zero init, then fitted
    torch.testing.assert_close(a.quant.int_weight(), b.quant.int_weight(), rtol=0, atol=0)
    assert report.layers[name]["block_fit"]["kept"] and report.layers[name]["block_fit"]["ratio"] < 1
    assert _logit_error(fit, tiny_model, calib16) < _logit_error(zero, tiny_model, calib16)


def test_apiq_svd_start_without_fit_is_gptq_lr(tiny_model, calib16):
    ours, _ = _compressed(tiny_model, ApiQ(bits=3, group_size=32, rank=4, start="svd", epochs=0), calib16)
    ref, _ = _compressed(tiny_model, GPTQLowRank(bits=3, group_size=32, rank=4), calib16)
    for name in adapter_for(ours).linear_names(ours):
        torch.testing.assert_close(ours.get_submodule(name).dense_weight(), ref.get_submodule(name).dense_weight())


def test_fisher_is_the_sum_of_per_window_squared_gradients(tiny_model, calib16):
    name = "model.layers.1.mlp.down_proj"
    got = fisher_diagonal(tiny_model, calib16[:3], [name], progress=False)[name]
    want = torch.zeros_like(got)
    w = tiny_model.get_submodule(name).weight
    for k in range(3):
        loss = tiny_model(input_ids=calib16[k:k + 1], labels=calib16[k:k + 1]).loss
        want += torch.autograd.grad(loss, w)[0].square()
    torch.testing.assert_close(got, want)
    assert not any(p.requires_grad is False for p in tiny_model.parameters())      # left as it was


def test_saliency_term_keeps_salient_weights_closer(tiny_model, calib16):
    """With the saliency term the fitted scales move the quantized weights less where the Fisher is
    large: the saliency-weighted weight change is smaller than without it."""
    fisher = fisher_diagonal(tiny_model, calib16, adapter_for(tiny_model).linear_names(tiny_model), progress=False)

    def weighted_change(model):
        return sum((fisher[n] * (model.get_submodule(n).quant.dense_weight()
                                 - tiny_model.get_submodule(n).weight.detach()).square()).sum().item() / fisher[n].sum().item()
                   for n in fisher)
    plain, _ = _compressed(tiny_model, ApiQ(bits=2, group_size=32, rank=4, epochs=3), calib16)
    salient, report = _compressed(tiny_model, ApiQ(bits=2, group_size=32, rank=4, epochs=3, saliency=100.0), calib16)
    assert report.layers["model.layers.0.mlp.up_proj"]["block_fit"]["kept"]
    assert weighted_change(salient) < weighted_change(plain)


def test_recover_trains_only_the_adapters_and_lowers_heldout_loss(tiny_model):
    # a learnable text: every window the same period-8 pattern, so held-out windows are predictable
    pattern = torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(3))
    calib = pattern.repeat(16, 4)                                              # (16, 32)
    model, _ = _compressed(tiny_model, ApiQ(bits=2, group_size=32, rank=4, epochs=0), calib)
    name = "model.layers.1.self_attn.o_proj"
    before = {k: v.clone() for k, v in model.get_submodule(name).state_dict().items()}
    info = train_adapters(model, calib, 30, lr=1e-2, progress=False)
    assert info["kept"] and info["heldout_loss_after"] < info["heldout_loss_before"]
    after = model.get_submodule(name).state_dict()
    assert set(k for k in before if not torch.equal(before[k], after[k])) <= {"up", "down"}
    assert not torch.equal(before["up"], after["up"]) and after["up"].dtype == before["up"].dtype


def test_recover_refuses_a_model_without_adapters(tiny_model, calib_tokens):
    with pytest.raises(LLMPressError, match="adapter"):
        train_adapters(tiny_model, calib_tokens, 5, progress=False)


def test_apiq_options_are_checked():
    with pytest.raises(LLMPressError, match="start"):
        ApiQ(start="eye")
    with pytest.raises(LLMPressError, match="epochs > 0"):
        ApiQ(saliency=1.0, epochs=0)


def test_cli_apiq_recover_exports_a_peft_adapter(tmp_path, tiny_hf_dir):
    pytest.importorskip("compressed_tensors")
    peft = pytest.importorskip("peft")
    import json
    from transformers import AutoModelForCausalLM
    from llmpress.cli import main
    from llmpress.export import load_compressed, read_manifest
    from conftest import compress_cli
    code, out, js = compress_cli(tiny_hf_dir, tmp_path, "--method", "apiq:epochs=1,group_size=32,bits=3", "--rank", "4",
                                 "--recover", "5")
    assert code == 0
    manifest = read_manifest(out)
    assert manifest["recovery"]["steps"] == 5 and json.loads(js.read_text())["recovery"]["steps"] == 5
    assert manifest["layers"]["model.layers.0.mlp.up_proj"]["epochs"] == 1
    ours, _ = load_compressed(out, runtime="rebuild")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = ours(ids).logits
    main(["export", str(out), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
          "--adapter-out", str(tmp_path / "lora")])
    from transformers import CompressedTensorsConfig
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=CompressedTensorsConfig(run_compressed=False))
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "lora")
    torch.testing.assert_close(with_adapter(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # --recover without adapter layers: refused before any work, nothing written
    (tmp_path / "b").mkdir()
    code, out2, _ = compress_cli(tiny_hf_dir, tmp_path / "b", "--method", "gptq", "--recover", "5")
    assert code != 0 and not out2.exists()
