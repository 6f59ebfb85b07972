"""Issue 13: clipping search, per-channel grids, quantization + low-rank correction, rotations."""
import copy

import numpy as np

import pytest
import torch

from conftest import assert_keeps_embedded_logits, needs_embedded, tiny_llama
from llmpress import GPTQ, RTN, AWQ, GPTQLowRank, Plan
from llmpress.arch import adapter_for
from llmpress.config import handler_for, parse_method_spec
from llmpress.errors import LLMPressError
from llmpress.methods.gptq import gptq_solve
from llmpress.methods.rtn import rtn_quantize
from llmpress.modules import QuantLinear, QuantLowRankLinear
from llmpress.pipeline import compress, relative_output_error
from llmpress.rotate import hadamard, rotate_model, rotation_matrix
from llmpress.stats import InputStats


def heavy_tailed(out_f=64, in_f=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[:, ::17] *= 6                                   # a few outlier columns, as in LLM weights
    x = torch.randn(2048, in_f, generator=g) * torch.linspace(0.2, 2.0, in_f)
    stats = InputStats(in_f)
    stats.add(x)
    return w, stats


def dequant(q, scale, zero, group_size):
    g = torch.arange(q.shape[1]) // (group_size or q.shape[1])
    return (q - zero[:, g]) * scale[:, g]


@pytest.mark.parametrize("group_size", [64, 0])
def test_mse_clip_lowers_rtn_error_and_stays_on_grid(group_size):
    w, _ = heavy_tailed()
    errs = {}
    for clip in (None, "mse"):
        q, scale, zero = rtn_quantize(w, 3, group_size, True, clip)
        assert q.min() >= 0 and q.max() <= 7 and torch.equal(q, q.round())
        errs[clip] = (dequant(q, scale, zero, group_size) - w).pow(2).sum(1)
    assert (errs["mse"] <= errs[None] + 1e-6).all()          # 1.0 is among the candidates
    assert errs["mse"].sum() < 0.8 * errs[None].sum()


def test_gptq_mse_clip_lowers_output_error():
    w, stats = heavy_tailed()
    h = stats.hessian()
    out = {}
    for clip in (None, "mse"):
        q, scale, zero, _ = gptq_solve(w, h, 3, 64, True, True, 0.01, clip)
        d = dequant(q, scale, zero, 64) - w
        out[clip] = ((d @ h) * d).sum()
    assert out["mse"] < 0.9 * out[None]


def test_per_channel_grid_is_one_scale_per_row_and_costs_what_it_stores():
    lin = torch.nn.Linear(256, 64, bias=False)
    cfg = RTN(bits=3, group_size=0)
    module, _ = handler_for(cfg)(lin, cfg, None)
    assert isinstance(module, QuantLinear) and module.scale.shape == (64, 1) and module.group_size == 256
    assert cfg.storage(64, 256)[0] == module.stored_bytes()
    assert 8 * module.stored_bytes() / (64 * 256) == pytest.approx(3 + 16 / 256)
    with pytest.raises(LLMPressError, match="group_size"):
        RTN(bits=3, group_size=-1)
    with pytest.raises(LLMPressError, match="clip"):
        parse_method_spec("gptq:bits=3,clip=max")


def test_gptq_lowrank_beats_gptq_and_improves_with_rank():
    w, stats = heavy_tailed()
    lin = torch.nn.Linear(256, 64, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
    errors = {}
    for cfg in (GPTQ(bits=3, group_size=0, clip="mse"), GPTQLowRank(bits=3, rank=4), GPTQLowRank(bits=3, rank=16)):
        module, info = handler_for(cfg)(lin, cfg, stats)
        errors[cfg.label()] = relative_output_error(lin.weight, module.dense_weight(), stats)
        # the cost model counts exactly what the module stores (the bias is the dense layer's own)
        assert cfg.storage(64, 256)[0] == module.stored_bytes() - 64 * 2
    e = list(errors.values())
    assert e[1] < e[0] and e[2] < e[1], errors
    assert isinstance(module, QuantLowRankLinear) and module.rank == 16
    x = torch.randn(3, 256)
    torch.testing.assert_close(module(x), x @ module.dense_weight().T + module.bias.float(), rtol=1e-4, atol=1e-4)


def test_gptq_lowrank_through_pipeline_save_load(tmp_path, tiny_model, calib_tokens, tiny_tokenizer):
    from llmpress.export import load_compressed, save_compressed
    names = adapter_for(tiny_model).linear_names(tiny_model)
    compress(tiny_model, Plan.uniform(GPTQLowRank(bits=2, rank=4)).resolve(names), calib_tokens, progress=False)
    assert all(isinstance(tiny_model.get_submodule(n), QuantLowRankLinear) for n in names)
    save_compressed(tiny_model, tiny_tokenizer, tmp_path / "out", {"plan": {}})
    back, _ = load_compressed(tmp_path / "out", runtime="rebuild")
    ids = calib_tokens[:2]
    assert torch.equal(back(ids).logits, tiny_model(ids).logits)


def test_awq_clip_changes_the_result(tiny_model, calib_tokens):
    names = adapter_for(tiny_model).linear_names(tiny_model)
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    compress(a, Plan.uniform(AWQ(bits=3, group_size=32)).resolve(names), calib_tokens, progress=False)
    compress(b, Plan.uniform(AWQ(bits=3, group_size=32, clip="mse")).resolve(names), calib_tokens, progress=False)
    n = names[-1]
    assert not torch.equal(a.get_submodule(n).dense_weight(), b.get_submodule(n).dense_weight())


@pytest.mark.parametrize("n", [12, 24, 36, 64, 72, 576, 896, 1536])
def test_hadamard_sizes(n):
    h = hadamard(n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))
    r = rotation_matrix("hadamard", n, seed=3)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=r.dtype))


def test_hadamard_refuses_sizes_without_a_construction():
    with pytest.raises(LLMPressError, match="random"):
        hadamard(14)
    r = rotation_matrix("random", 14, seed=0)
    torch.testing.assert_close(r @ r.T, torch.eye(14, dtype=r.dtype))


def _with_random_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_keeps_logits_and_unties(kind, tmp_path):
    from transformers import AutoModelForCausalLM
    model = _with_random_norms(tiny_llama())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    before = {n: p.clone() for n, p in model.named_parameters()}
    info = rotate_model(model, kind, seed=1)
    assert info["untied_embeddings"] and not model.config.tie_word_embeddings
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    model.save_pretrained(tmp_path / "rot")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "rot")
    torch.testing.assert_close(back(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_rotation_refuses_compressed_or_unknown_models(tiny_model, calib_tokens):
    names = adapter_for(tiny_model).linear_names(tiny_model)
    compress(tiny_model, {names[0]: RTN(bits=4, group_size=32)}, calib_tokens, progress=False)
    with pytest.raises(LLMPressError, match="dense"):
        rotate_model(tiny_model)


def test_rotated_then_quantized_exports_to_compressed_tensors(tmp_path, tiny_tokenizer, calib_tokens):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from llmpress.formats import export_compressed_tensors
    model = _with_random_norms(tiny_llama())
    rotate_model(model, "hadamard")
    names = adapter_for(model).linear_names(model)
    compress(model, Plan.uniform(GPTQ(bits=4, group_size=32, clip="mse")).resolve(names), calib_tokens, progress=False)
    ids = calib_tokens[:2]
    ref = model(ids).logits
    out = export_compressed_tensors(model, tiny_tokenizer, tmp_path / "ct")    # consumes the model
    back = AutoModelForCausalLM.from_pretrained(out)
    assert not back.config.tie_word_embeddings
    torch.testing.assert_close(back(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_cli_compress_rotated(tmp_path, tiny_hf_dir):
    from llmpress.cli import main
    from llmpress.export import load_compressed, read_manifest
    out = tmp_path / "out"
    main(["compress", "--model", str(tiny_hf_dir), "--method", "gptq-lr", "--bits", "3", "--rank", "4",
          "--rotate", "hadamard", "--calib", str(tiny_hf_dir / "config.json"), "--num-samples", "4",
          "--seq-len", "16", "--out", str(out)])
    model, _ = load_compressed(out, runtime="rebuild")
    assert read_manifest(out)["rotation"]["kind"] == "hadamard"
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), QuantLowRankLinear)


@pytest.mark.slow
@needs_embedded
def test_rotation_keeps_embedded_model_logits():
    from llmpress.models import load_model
    model, tok = load_model("smollm2-135m")
    assert_keeps_embedded_logits(model, tok, lambda m: rotate_model(m, "hadamard"))


def test_rotation_search_picks_the_smallest_measured_error(tiny_model, calib_tokens):
    from llmpress.rotate import choose_rotation
    best, errors = choose_rotation(tiny_model, calib_tokens, "hadamard", range(3), progress=False)
    assert set(errors) == {0, 1, 2} and errors[best] == min(errors.values())
    assert len(set(errors.values())) == 3       # the signs change the rotated weights' grid error


def test_menu_entries_fix_options():
    from llmpress.budget import menu_configs
    menu = menu_configs("gptq:group_size=0,clip=mse;gptq-lr:rank=8")
    gptq = [c for c in menu if c.method == "gptq"]
    assert [c.bits for c in gptq] == [2, 3, 4, 8] and all(c.group_size == 0 and c.clip == "mse" for c in gptq)
    assert {c.rank for c in menu if c.method == "gptq-lr"} == {8}
    assert menu_configs("gptq,sparsegpt") == menu_configs("gptq;sparsegpt")
    with pytest.raises(LLMPressError, match="no option"):
        menu_configs("gptq:colour=red")


def test_oats_beats_wanda_at_equal_parameters_on_a_sparse_plus_lowrank_weight():
    from llmpress import OATS, Wanda
    from llmpress.modules import SparseLowRankLinear
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 16, generator=g) @ torch.randn(16, 256, generator=g) / 4 + 0.3 * torch.randn(128, 256, generator=g)
    lin = torch.nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    stats = InputStats(256)
    stats.add(torch.randn(4096, 256, generator=g) * torch.linspace(0.2, 2.0, 256))
    errs, cfgs = {}, (Wanda(sparsity=0.5), OATS(param_ratio=0.5, iters=10))
    for cfg in cfgs:
        module, info = handler_for(cfg)(lin, cfg, stats)
        errs[cfg.method] = relative_output_error(lin.weight, module.dense_weight(), stats)
        assert cfg.storage(128, 256)[0] == module.stored_bytes()
    assert isinstance(module, SparseLowRankLinear)
    kept = module.sparse.bool_mask().sum(1)
    assert (kept == info["kept_per_row"]).all()
    assert cfgs[1].storage(128, 256)[1] <= 0.5 * 128 * 256        # no more parameters than Wanda keeps
    assert errs["oats"] < errs["wanda"], errs


def test_oats_through_pipeline_save_load(tmp_path, tiny_model, calib_tokens, tiny_tokenizer):
    from llmpress import OATS
    from llmpress.export import load_compressed, save_compressed
    names = adapter_for(tiny_model).linear_names(tiny_model)
    compress(tiny_model, Plan.uniform(OATS(param_ratio=0.6, iters=3)).resolve(names), calib_tokens, progress=False)
    save_compressed(tiny_model, tiny_tokenizer, tmp_path / "out", {"plan": {}})
    back, _ = load_compressed(tmp_path / "out", runtime="rebuild")
    ids = calib_tokens[:2]
    assert torch.equal(back(ids).logits, tiny_model(ids).logits)


@pytest.mark.parametrize("method", ["gptq-lr:bits=3,rank=4", "oats:param_ratio=0.6,iters=3"])
def test_composites_export_dense_and_compressed_tensors(method, tmp_path, tiny_tokenizer, calib_tokens):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from safetensors import safe_open
    from llmpress.formats import export_compressed_tensors, export_dense
    model = tiny_llama()
    names = adapter_for(model).linear_names(model)
    plan = Plan([("*.mlp.*", parse_method_spec(method)), ("*", GPTQ(bits=4, group_size=32))])
    compress(model, plan.resolve(names), calib_tokens, progress=False)
    ids = calib_tokens[:2]
    ref = model(ids).logits
    for fmt, export in (("dense", export_dense), ("ct", export_compressed_tensors)):
        out = export(copy.deepcopy(model), tiny_tokenizer, tmp_path / fmt)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if ".quant." in k or ".sparse." in k or k.endswith((".up", ".down"))]
        back = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(back(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_allocator_table_covers_the_new_options(tiny_model, calib_tokens):
    from llmpress.budget import Budget, menu_configs, plan_for_budget
    rotate_model(tiny_model, "hadamard")
    menu = menu_configs("gptq:group_size=0,clip=mse;gptq-lr:group_size=0;oats")
    alloc = plan_for_budget(tiny_model, calib_tokens, Budget.parse("bits=3"), menu, sample_windows=2, progress=False)
    labels = {o["label"] for layer in alloc.table.layers.values() for o in layer["options"] if o["config"]}
    assert labels == {c.label() for c in menu}
    names = adapter_for(tiny_model).linear_names(tiny_model)
    compress(tiny_model, alloc.plan.resolve(names), calib_tokens, progress=False)
    from llmpress.eval import model_size
    assert model_size(tiny_model)["bits_per_weight"] <= 3.0


def test_cli_export_lora_adapter_reloads_exactly(tmp_path, tiny_hf_dir):
    pytest.importorskip("compressed_tensors")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    from llmpress.cli import main
    from llmpress.export import load_compressed
    out = tmp_path / "out"
    main(["compress", "--model", str(tiny_hf_dir), "--method", "gptq-lr", "--bits", "3", "--group-size", "32",
          "--rank", "4", "--calib", str(tiny_hf_dir / "config.json"), "--num-samples", "4",
          "--seq-len", "16", "--out", str(out)])
    ours, _ = load_compressed(out, runtime="rebuild")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = ours(ids).logits
    main(["export", str(out), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
          "--adapter-out", str(tmp_path / "lora")])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert not torch.allclose(base(ids).logits, ref, atol=1e-4)          # the corrections matter
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "lora")
    torch.testing.assert_close(with_adapter(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert main(["export", str(out), "--format", "dense", "--out", str(tmp_path / "d"),
                 "--adapter-out", str(tmp_path / "l2")]) != 0
    assert not (tmp_path / "d").exists() and not (tmp_path / "l2").exists()


def test_gguf_export_with_lora_adapter(tmp_path, tiny_hf_dir):
    """gptq-lr layers on the Q4_0 grid: the GGUF holds their quantized base as Q4_0 blocks and the
    adapter file their factors (q/k rows permuted like the base): base + adapter = llmpress's model."""
    import gguf
    from transformers import AutoModelForCausalLM
    from llmpress.cli import main
    from llmpress.export import load_compressed
    from llmpress.gguf_export import _qk_permutation
    out = tmp_path / "out"
    assert main(["compress", "--model", str(tiny_hf_dir), "--method", "gptq-lr", "--bits", "4", "--group-size", "32",
                 "--rank", "4", "--calib", str(tiny_hf_dir / "config.json"), "--num-samples", "4",
                 "--seq-len", "16", "--out", str(out)]) == 0
    ours, _ = load_compressed(out, runtime="rebuild")
    assert main(["export", str(out), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--adapter-out", str(tmp_path / "lora.gguf")]) == 0
    base = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert base["blk.0.attn_q.weight"] == "Q4_0" and base["blk.1.ffn_down.weight"] == "Q4_0"
    reader = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
    lora = {t.name: torch.from_numpy(np.asarray(t.data).copy()).float() for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    config = model.config
    with torch.no_grad():
        for name, module in ours.named_modules():
            if not isinstance(module, QuantLowRankLinear):
                continue
            block, layer = name.split(".")[2], name.split(".", 3)[-1]
            gname = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down"}[layer]
            a, b = lora[f"blk.{block}.{gname}.weight.lora_a"], lora[f"blk.{block}.{gname}.weight.lora_b"]
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gname)
            if heads:
                b = b[torch.argsort(_qk_permutation(b.shape[0], heads))]
            assert torch.equal(a, module.down.float()) and torch.equal(b, module.up.float())
            target = model.get_submodule(name)
            assert torch.equal(target.weight, module.quant.dense_weight())        # the base, exactly
            target.weight += b @ a
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size,bits,gguf", [(64, 3, None), (0, 3, None), (64, 2, None), (32, 4, "q4_k")])
def test_gptq_refine_lowers_the_output_error_and_stays_on_the_grid(group_size, bits, gguf):
    """QuantEase's coordinate descent after GPTQ: never a higher layer error, on the same grid."""
    from llmpress.methods import ggml_grid
    from llmpress.methods.gptq import gptq_solve
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g) * torch.rand(256, generator=g) * 3      # uneven channels
    h = x.T @ x / 2048
    w = torch.randn(96, 256, generator=g)
    grid = None
    if gguf:
        scale, offset, _ = ggml_grid.fit(w, ggml_grid.ggml_type(gguf), None, torch.diagonal(h))
        grid = (scale, offset)
    errors, results = [], []
    for refine in (0, 5):
        q, s, z, info = gptq_solve(w, h, bits, group_size, True, True, 0.01, None, grid, refine)
        gs = group_size or 256
        s, z = s.repeat_interleave(gs, 1), z.repeat_interleave(gs, 1)
        deq = q * s + z if gguf else (q - z) * s
        errors.append((((deq - w) @ h) * (deq - w)).sum().item())
        results.append((q, info))
        assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 2 ** bits - 1
    assert errors[1] < 0.99 * errors[0]
    assert results[1][1]["refine"]["sweeps"] >= 1 and results[1][1]["refine"]["error_ratio"] < 1
    assert not torch.equal(results[0][0], results[1][0])


def test_gptq_refine_through_the_pipeline(tiny_model, calib_tokens):
    from llmpress import GPTQ
    base = copy.deepcopy(tiny_model)
    plan = {n: GPTQ(bits=3, group_size=32, refine=3) for n in adapter_for(tiny_model).linear_names(tiny_model)}
    report = compress(tiny_model, plan, calib_tokens, progress=False, measure_error=True)
    plain = copy.deepcopy(base)
    report0 = compress(plain, {n: GPTQ(bits=3, group_size=32) for n in plan}, calib_tokens, progress=False,
                       measure_error=True)
    assert all(0 < v["refine"]["error_ratio"] <= 1 for v in report.layers.values())
    # block 0 sees the same inputs in both runs: its layers' errors can only be lower
    for k, v in report.layers.items():
        if k.startswith("model.layers.0."):
            assert v["output_error"] <= report0.layers[k]["output_error"] + 1e-9
    with pytest.raises(LLMPressError, match="refine"):
        GPTQ(refine=-1)
