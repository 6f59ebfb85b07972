"""Mixtures of experts: every supported layout built tiny from a config (hidden 256, 2 layers, 8
experts, top-2), compressed expert by expert, saved, reloaded and exported."""
import copy

import pytest
import torch

from llmpress import Plan
from llmpress.arch import adapter_for, check_supported
from llmpress.arch.moe import RoutedExperts, all_experts_calibration
from llmpress.config import parse_method_spec
from llmpress.errors import LLMPressError
from llmpress.pipeline import compress

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "granitemoe"]


def tiny_moe(arch: str, seed: int = 0, **over):
    import transformers as tf
    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                  max_position_embeddings=256)
    if arch == "qwen2_moe":
        config = tf.Qwen2MoeConfig(**common, num_experts=8, moe_intermediate_size=256,
                                   shared_expert_intermediate_size=512)
    elif arch == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, num_experts=8, moe_intermediate_size=256, head_dim=64)
    elif arch == "mixtral":
        config = tf.MixtralConfig(**{**common, "intermediate_size": 256}, num_local_experts=8)
    elif arch == "olmoe":
        config = tf.OlmoeConfig(**{**common, "intermediate_size": 256, "num_key_value_heads": 4}, num_experts=8)
    else:
        config = tf.GraniteMoeConfig(**{**common, "intermediate_size": 256}, num_local_experts=8)
    for k, v in over.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():       # routers initialised at zero would route every token alike
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.ndim == 2 and p.shape[0] == 8:
                p.normal_(0, 0.5)
    return model


def tokens(n: int = 4, t: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_as_linears_keep_the_model(arch):
    model = tiny_moe(arch)
    x = tokens()
    before = logits(model, x)
    adapter = adapter_for(model)
    names = adapter.linear_names(model)
    moe = adapter.blocks(model)[0].get_submodule(adapter.moe.moe_path)
    assert isinstance(moe.experts, RoutedExperts) and len(moe.experts) == 8
    assert sum(adapter.is_expert(n.split(".", 3)[3]) for n in names) == 2 * 8 * 3
    assert (arch == "qwen2_moe") == any("shared_expert." in n for n in names)
    assert not any(n.endswith(("gate", "router", "shared_expert_gate")) for n in names)   # routers stay dense
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=1e-5)
    adapter_for(model)                                                  # idempotent
    assert isinstance(moe.experts, RoutedExperts)


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_per_expert_saves_reloads_and_exports(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmpress.export import load_compressed, save_compressed
    from llmpress.formats import export_dense
    model = tiny_moe(arch)
    x = tokens()
    dense = logits(model, x)
    fused_before = copy.deepcopy(model)
    adapter = adapter_for(model)
    report = compress(model, Plan.uniform(parse_method_spec("gptq:bits=4,group_size=128")).resolve(
        adapter.linear_names(model)), x, progress=False)
    out = logits(model, x)
    assert not torch.equal(out, dense) and torch.isfinite(out).all()
    expert_rows = {k: v for k, v in report.layers.items() if ".experts." in k}
    assert len(expert_rows) == 2 * 8 * 3
    # the routed tokens per expert sum to tokens x top-k in each layer
    per_layer = {}
    for k, v in expert_rows.items():
        if k.endswith("gate_proj"):
            per_layer[k.split(".")[2]] = per_layer.get(k.split(".")[2], 0) + v["tokens"]
    assert per_layer == {"0": x.numel() * 2, "1": x.numel() * 2}
    # every expert's weights changed and stay on the 4-bit grid (16 levels per group row)
    for e in range(8):
        new = model.get_submodule(f"model.layers.0.{adapter.moe.moe_path}.experts.{e}.down_proj").dense_weight()
        old = fused_before.get_submodule(f"model.layers.0.{adapter.moe.moe_path}.experts").down_proj[e]
        assert not torch.equal(new, old)
        assert new[:, :128].unique(dim=None).numel() <= 16 * new.shape[0]
    save_compressed(model, None, tmp_path / "native", {})
    again, _ = load_compressed(tmp_path / "native", runtime="rebuild")
    assert torch.equal(logits(again, x), out)
    export_dense(model, None, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(logits(plain, x), out, rtol=0, atol=1e-4)
    # compressed-tensors: per-expert packed tensors and targets under the Hub's names, routers ignored
    from llmpress.formats import export_compressed_tensors
    if arch == "granitemoe":
        with pytest.raises(LLMPressError, match="store experts fused"):
            export_compressed_tensors(again, None, tmp_path / "ct")
        assert not (tmp_path / "ct").exists()
        return
    export_compressed_tensors(again, None, tmp_path / "ct")       # (exports turn their model dense)
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    torch.testing.assert_close(logits(packed, x), out, rtol=0, atol=1e-4)
    import json
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert len(targets) == len(report.layers) and any("router" in p or "gate$" in p for p in qc["ignore"])
    if arch == "mixtral":
        assert any(r"block_sparse_moe\.experts\.3\.w3" in t for t in targets)


def _routed_inputs(model, adapter, x, layer: int):
    """The inputs of layer `layer`'s sparse block (S, H) and its router's top-k choice (S, k)."""
    seen = {}
    moe = adapter.blocks(model)[layer].get_submodule(adapter.moe.moe_path)
    h = moe.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].reshape(-1, a[0].shape[-1])))
    try:
        logits(model, x)
    finally:
        h.remove()
    router = getattr(moe, adapter.moe.router)
    _, _, index = router(seen["x"])
    return seen["x"], index


def test_expert_statistics_are_their_routed_tokens():
    from llmpress.walk import BlockWalk
    model = tiny_moe("qwen3_moe")
    adapter = adapter_for(model)
    x = tokens(2, 32)
    inputs, index = _routed_inputs(model, adapter, x, 0)
    walk = BlockWalk(model, batch_size=8, progress=False)
    hidden = walk.capture(x)
    with walk.placed(0, keep=False) as block:
        _, stats = walk.collect(block, hidden, walk.all_heads())
        with all_experts_calibration(block):
            _, every = walk.collect(block, hidden, walk.all_heads())
    for e in range(8):
        routed = inputs[(index == e).any(-1)].double()
        st = stats[f"mlp.experts.{e}.gate_proj"]
        assert st.count == routed.shape[0]
        torch.testing.assert_close(st.gram_matrix().double(), routed.T @ routed, rtol=1e-4, atol=1e-3)
        assert every[f"mlp.experts.{e}.up_proj"].count == inputs.shape[0]    # all tokens, all experts


def test_router_weighted_statistics_weigh_each_routed_token_by_its_router_weight():
    """sum over the tokens routed to e of g_e(x)^2 x x^T (g: the token's router weight for e), the
    counts still the routed counts; outputs unchanged; refused with calibrate-all and on dense models."""
    from llmpress.arch.moe import router_weighted_calibration
    from llmpress.walk import BlockWalk
    model = tiny_moe("qwen3_moe", norm_topk_prob=True)
    adapter = adapter_for(model)
    x = tokens(2, 32)
    inputs, index = _routed_inputs(model, adapter, x, 0)
    moe = adapter.blocks(model)[0].get_submodule(adapter.moe.moe_path)
    _, weights, _ = getattr(moe, adapter.moe.router)(inputs)
    walk = BlockWalk(model, batch_size=8, progress=False)
    hidden = walk.capture(x)
    with walk.placed(0, keep=False) as block:
        plain_out, _ = walk.collect(block, hidden, walk.all_heads())
        with router_weighted_calibration(block):
            out, stats = walk.collect(block, hidden, walk.all_heads())
    assert torch.equal(out, plain_out)
    for e in range(8):
        t, pos = torch.where(index == e)
        xs = inputs[t].double() * weights[t, pos].double()[:, None]
        st = stats[f"mlp.experts.{e}.gate_proj"]
        assert st.count == t.numel()
        torch.testing.assert_close(st.gram_matrix().double(), xs.T @ xs, rtol=1e-4, atol=1e-4)
    from llmpress.pipeline import compress
    with pytest.raises(LLMPressError, match="router-weighted"):
        compress(model, {}, x, router_weighted=True, calibrate_all_experts=True, progress=False)
    from conftest import tiny_llama
    with pytest.raises(LLMPressError, match="router-weighted"):
        compress(tiny_llama(), {}, x, router_weighted=True, progress=False)


def test_calibrating_all_experts_leaves_the_outputs():
    model = tiny_moe("mixtral")
    adapter = adapter_for(model)
    x = tokens(2, 32)
    before = logits(model, x)
    with all_experts_calibration(model):
        during = logits(model, x)
    torch.testing.assert_close(during, before, rtol=0, atol=1e-5)    # same sums; matmuls of other sizes
    names = adapter.linear_names(model)
    spec = parse_method_spec("gptq:bits=4,group_size=128")
    report = compress(model, Plan.uniform(spec).resolve(names), x, progress=False, calibrate_all_experts=True)
    assert {v["tokens"] for k, v in report.layers.items() if ".experts." in k} == {x.numel()}


def test_experts_without_tokens_take_the_data_free_solution():
    """2 tokens, top-2 of 8: at least 4 experts per layer get no token. They must come out as RTN on
    the same grid (GPTQ under identity statistics), recorded, never NaN or zeroed; experts with a
    token or two get raised damping, also recorded."""
    from llmpress.methods.rtn import rtn_quantize
    model = tiny_moe("qwen3_moe")
    adapter = adapter_for(model)
    x = tokens(1, 2)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in adapter.linear_names(model)}
    spec = parse_method_spec("gptq:bits=4,group_size=128,act_order=false")
    report = compress(model, Plan([("*.experts.*", spec)]).resolve(adapter.linear_names(model)), x, progress=False)
    empty = [k for k, v in report.layers.items() if v["tokens"] == 0]
    few = [k for k, v in report.layers.items() if 0 < v["tokens"] < 128]
    assert len(empty) >= 2 * 4 * 3 and len(few) >= 2 and len(empty) + len(few) == len(report.layers)
    assert all("data-free" in report.layers[k]["expert_fallback"] for k in empty)
    assert all("damping raised" in report.layers[k]["expert_fallback"] for k in few)
    for k in empty:
        q, scale, zero = rtn_quantize(originals[k].float(), 4, 128, True)
        g = torch.arange(q.shape[1]) // 128
        torch.testing.assert_close(model.get_submodule(k).dense_weight(), (q - zero[:, g]) * scale[:, g])
    assert torch.isfinite(logits(model, x)).all()


def test_moe_bad_input():
    with pytest.raises(LLMPressError, match="mixtures of experts .*qwen3_moe.*deepseek_v3 is left out"):
        check_supported("deepseek_v3")
    with pytest.raises(LLMPressError, match="mlp_only_layers"):
        adapter_for(tiny_moe("qwen3_moe", mlp_only_layers=[1]))
    model = tiny_moe("olmoe")
    names = adapter_for(model).linear_names(model)
    with pytest.raises(LLMPressError, match="match no compressible layer"):
        Plan([("*.experts.8.*", parse_method_spec("rtn:bits=4"))]).resolve(names)
    with pytest.raises(LLMPressError, match="calibrate_all_experts"):
        compress(model, Plan.uniform(parse_method_spec("gptq:bits=4")).resolve(names), tokens(1, 8),
                 progress=False, reference=0.25)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_cli_compress_and_export_a_moe_folder(arch, tmp_path, tiny_tokenizer, capsys):
    """`compress` on a Hugging Face MoE folder (with resume checkpoints on), then the dense export
    reloads in plain transformers with llmpress's logits."""
    import json

    from transformers import AutoModelForCausalLM

    from llmpress.cli import main
    from llmpress.models import load_model
    src = tmp_path / "moe-hf"
    tiny_moe(arch).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "gptq4"
    prune = ["--prune-experts", "0.25"] if arch == "mixtral" else ["--router-weighted-stats"]
    code = main(["compress", "--model", str(src), "--method", "gptq", "--bits", "4", "--group-size", "128",
                 "--calib", str(text), "--num-samples", "4", "--seq-len", "32", "--out", str(out), *prune])
    err = capsys.readouterr().err
    assert code == 0, err
    assert ("12 experts:" if arch == "mixtral" else "16 experts:") in err
    if arch != "mixtral":
        assert json.loads((out / "llmpress.json").read_text())["calibration"]["router_weighted_stats"] is True
    else:
        assert "experts: 8 -> 6 per layer (reap)" in err
        assert json.loads((out / "config.json").read_text())["num_local_experts"] == 6
        pruning = json.loads((out / "llmpress.json").read_text())["expert_pruning"]
        assert pruning["criterion"] == "reap" and pruning["experts_after"] == 6 and len(pruning["kept"]) == 2
    report = json.loads((out / "llmpress.json").read_text())["report"]
    assert sum(v["tokens"] for k, v in report.items() if ".experts." in k and k.endswith("gate_proj")) == 2 * 4 * 32 * 2
    ours, _ = load_model(str(out), runtime="rebuild")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(ours, ids)
    code = main(["export", str(out), "--format", "dense", "--out", str(tmp_path / "dense")])
    assert code == 0, capsys.readouterr().err
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), ids), ref,
                               rtol=0, atol=1e-4)


GGUF_MOE = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama"}


@pytest.mark.parametrize("arch", sorted(GGUF_MOE))
def test_gguf_export_of_moe_runs_in_llamacpp(arch, tmp_path):
    """llama.cpp's expert layout (blk.N.ffn_{gate,up,down}_exps, E stacked, the router as
    ffn_gate_inp, qwen2moe's shared expert as *_shexp): float weights agree with transformers
    within 5e-3 in next-token log-probability, GPTQ on Q4_K experts within 5e-2 of llmpress's."""
    import gguf
    pytest.importorskip("xllamacpp")
    from conftest import bpe_tokenizer
    from test_gguf_arch import assert_llamacpp_agrees

    from llmpress.gguf_export import export_gguf, tokenizer_metadata
    tok = bpe_tokenizer(290)
    fields, _ = tokenizer_metadata(tok, 512)
    for quant in (None, "gptq:gguf=q4_k"):
        model = tiny_moe(arch, **({"norm_topk_prob": True} if arch == "qwen3_moe" else {}))
        adapter = adapter_for(model)
        if quant:
            compress(model, Plan.uniform(parse_method_spec(quant)).resolve(adapter.linear_names(model)),
                     tokens(), progress=False)
        path = tmp_path / f"{quant is not None}.gguf"
        types = export_gguf(model, path, tokenizer_fields=fields)
        reader = gguf.GGUFReader(str(path))
        assert reader.fields["general.architecture"].contents() == GGUF_MOE[arch]
        assert reader.fields[f"{GGUF_MOE[arch]}.expert_count"].contents() == 8
        assert reader.fields[f"{GGUF_MOE[arch]}.expert_used_count"].contents() == 2
        exps = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight")
        assert list(exps.shape) == [256, 256, 8]                          # GGML ne: (I, H, E)
        assert types["blk.0.ffn_gate_inp.weight"] == "F32"
        assert types["blk.0.ffn_up_exps.weight"] == ("Q4_K" if quant else "F32")
        if quant:    # the stacked bytes are the experts' own, expert by expert
            got = gguf.quants.dequantize(exps.data, exps.tensor_type).reshape(8, 256, 256)
            want = model.get_submodule(f"model.layers.1.{adapter.moe.moe_path}.experts.5.down_proj").dense_weight()
            assert torch.equal(torch.from_numpy(got[5].copy()), want)
        assert_llamacpp_agrees(path, model, tok, tol=5e-2 if quant else 5e-3)


def test_gguf_export_of_moe_refusals(tmp_path):
    from llmpress.gguf_export import export_gguf
    model = tiny_moe("qwen3_moe", norm_topk_prob=True)
    adapter = adapter_for(model)
    names = adapter.linear_names(model)
    compress(model, Plan([("*.experts.0.*", parse_method_spec("rtn:gguf=q6_k")),
                          ("*.experts.*", parse_method_spec("rtn:gguf=q4_k"))]).resolve(names), None, progress=False)
    with pytest.raises(LLMPressError, match="one tensor of one type"):
        export_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.iterdir())
    with pytest.raises(LLMPressError, match="always renormalizes"):
        export_gguf(tiny_moe("qwen3_moe"), tmp_path / "n.gguf")
    for arch in ("olmoe", "granitemoe"):
        with pytest.raises(LLMPressError, match=f"got '{arch}' \\(llama.cpp's"):
            export_gguf(tiny_moe(arch), tmp_path / "o.gguf")


def test_a_moe_gguf_is_not_loaded_through_transformers_reader(tmp_path):
    from llmpress.gguf_export import export_gguf
    from llmpress.models import load_model
    export_gguf(tiny_moe("mixtral"), tmp_path / "m.gguf")
    with pytest.raises(LLMPressError, match="mixture of experts .*llama, 8 experts.*dense Llama"):
        load_model(str(tmp_path / "m.gguf"), runtime="rebuild")


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_pruning_exports_a_standard_smaller_model(arch, tmp_path):
    """REAP / frequency scores over the routed tokens; 25 % of the experts pruned in every layer,
    router rows cut to the kept ones; the config says 6 experts and plain transformers reloads it
    with llmpress's logits."""
    from transformers import AutoModelForCausalLM

    from llmpress.experts import choose_experts, expert_scores, experts_to_keep, prune_experts, score
    from llmpress.formats import export_dense
    model = tiny_moe(arch)
    x = tokens()
    scores = expert_scores(model, x, progress=False)
    assert [int(r["tokens"].sum()) for r in scores] == [x.numel() * 2] * 2
    keep = choose_experts(scores, experts_to_keep(model, 0.25), "reap")
    freq = choose_experts(scores, 6, "frequency")
    for record, kept in zip(scores, keep):
        s = score(record, "reap")
        assert len(kept) == 6 and min(s[kept]) >= max(s[[e for e in range(8) if e not in kept]])
    assert all(len(k) == 6 for k in freq)
    router = getattr(adapter_for(model).blocks(model)[0].get_submodule(adapter_for(model).moe.moe_path),
                     adapter_for(model).moe.router)
    rows = router.weight[keep[0]].clone()
    prune_experts(model, keep)
    assert torch.equal(router.weight if router.weight.shape[0] == 6 else getattr(
        adapter_for(model).blocks(model)[0].get_submodule(adapter_for(model).moe.moe_path), adapter_for(model).moe.router).weight, rows)
    assert adapter_for(model).moe.num_experts(model.config) == 6
    out = logits(model, x)
    assert torch.isfinite(out).all()
    export_dense(model, None, tmp_path / "dense")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), x), out,
                               rtol=0, atol=1e-5)


def test_expert_pruning_refusals():
    from llmpress.experts import experts_to_keep, prune_experts
    model = tiny_moe("qwen3_moe")
    with pytest.raises(LLMPressError, match="at least the 2"):
        experts_to_keep(model, 0.9)
    with pytest.raises(LLMPressError, match="same number"):
        prune_experts(model, [[0, 1, 2], [0, 1]])
    with pytest.raises(LLMPressError, match="distinct indices below 8"):
        prune_experts(model, [[0, 1, 9], [0, 1, 2]])
    from conftest import tiny_llama
    with pytest.raises(LLMPressError, match="mixtures of experts"):
        experts_to_keep(tiny_llama(), 0.25)


def test_vllm_fused_groups_put_every_expert_of_a_layer_on_one_choice():
    """vLLM runs a layer's experts in one fused kernel on one scheme: the allocator's fused groups
    (--target vllm) hold every expert projection of a layer, so a plan never mixes schemes there."""
    from llmpress.allocate import allocate, fused_groups
    from llmpress.budget import Budget, Table
    model = tiny_moe("qwen2_moe")
    adapter = adapter_for(model)
    names = adapter.linear_names(model)
    groups = fused_groups(model)
    experts0 = sorted(n for n in names if ".0.mlp.experts." in n)
    assert len(experts0) == 8 * 3 and sorted(next(g for g in groups if experts0[0] in g)) == experts0
    assert ["model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.up_proj"] in groups
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in groups
    g = torch.Generator().manual_seed(0)
    layers = {}
    for n in names:
        m = model.get_submodule(n)
        p = m.in_features * m.out_features
        layers[n] = {"out": m.out_features, "in": m.in_features, "params": p, "options": [
            {"label": "dense", "bytes": 4 * p, "params": p, "error": 0.0},
            {"label": "w8", "bytes": p, "params": p, "error": torch.rand(1, generator=g).item() * 1e-3},
            {"label": "w4", "bytes": p // 2, "params": p, "error": torch.rand(1, generator=g).item()}]}
    table = Table(layers, {})
    choice, info = allocate(table, Budget.parse("bits=6"), "knapsack", fuse_groups=groups)
    assert info["fused"]
    for group in groups:
        assert len({choice[n] for n in group}) == 1, group
    assert len({choice[n] for n in experts0}) == 1


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_expert_rows_measured_on_the_sparse_block_alone_equal_the_whole_blocks(arch, monkeypatch):
    """The sensitivity table runs only the sparse block (router, experts, shared expert) for its
    linears: the block adds its output to the residual last, so the errors are the whole block's."""
    import dataclasses
    from llmpress import arch as arch_mod
    from llmpress.budget import measure_sensitivity
    from llmpress.methods.rtn import RTN
    model = tiny_moe(arch)
    adapter = adapter_for(model)
    assert adapter.tail == adapter.moe.moe_path
    x = tokens(4, 32)
    menu = [RTN(bits=3, group_size=32)]
    tail = measure_sensitivity(model, x, menu, sample_windows=2, progress=False)
    monkeypatch.setattr(arch_mod, "moe_adapter", lambda config: dataclasses.replace(adapter, tail=None))
    whole = measure_sensitivity(model, x, menu, sample_windows=2, progress=False)
    experts = [n for n in tail.layers if ".experts." in n]
    assert experts and tail.layers.keys() == whole.layers.keys()
    for name in tail.layers:
        a, b = tail.layers[name]["options"][1], whole.layers[name]["options"][1]
        assert a["error"] > 0 or ".experts." in name
        for field in ("error", "block_error"):
            assert a[field] == pytest.approx(b[field], rel=1e-4, abs=1e-12), (name, field)


def test_merge_groups_lead_with_the_most_routed_and_join_by_router_similarity():
    from llmpress.experts import merge_groups
    z = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    z[:, 3] = 2 * z[:, 1] + 0.01 * z[:, 3]                  # expert 3's logits follow expert 1's
    stats = [{"tokens": torch.tensor([50.0, 40.0, 30.0, 5.0]), "logit_gram": (z.T @ z).double()}]
    assert merge_groups(stats, 3) == [[[0], [1, 3], [2]]]
    with pytest.raises(LLMPressError):
        merge_groups(stats, 4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_merging_an_expert_with_its_permuted_copy_gives_the_expert_back(arch, tmp_path):
    """MC-SMoE's alignment: expert 1 is expert 0 with its intermediate neurons permuted, so after
    alignment their frequency-weighted average is expert 0 itself; the merged model is a standard
    config with 7 experts that plain transformers reloads with llmpress's logits."""
    from transformers import AutoModelForCausalLM

    from llmpress.experts import align, merge_experts, merge_stats
    from llmpress.formats import export_dense
    model = tiny_moe(arch)
    adapter = adapter_for(model)
    moe = adapter.blocks(model)[0].get_submodule(adapter.moe.moe_path)
    e0, e1 = moe.experts[0], moe.experts[1]
    perm = torch.randperm(e0.gate_proj.out_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        e1.gate_proj.weight.copy_(e0.gate_proj.weight[perm])
        e1.up_proj.weight.copy_(e0.up_proj.weight[perm])
        e1.down_proj.weight.copy_(e0.down_proj.weight[:, perm])
    assert torch.equal(e0.gate_proj.weight, e1.gate_proj.weight[align(e0, e1)])     # the permutation is found
    want = [m.weight.clone() for m in (e0.gate_proj, e0.up_proj, e0.down_proj)]
    x = tokens()
    stats = merge_stats(model, x, progress=False)
    assert [int(r["tokens"].sum()) for r in stats] == [x.numel() * 2] * 2
    groups = [[[0, 1]] + [[e] for e in range(2, 8)]] * 2
    merge_experts(model, groups, stats)
    merged = adapter_for(model).blocks(model)[0].get_submodule(adapter.moe.moe_path).experts[0]
    for m, w in zip((merged.gate_proj, merged.up_proj, merged.down_proj), want):
        torch.testing.assert_close(m.weight, w, rtol=0, atol=1e-6)
    assert adapter_for(model).moe.num_experts(model.config) == 7
    out = logits(model, x)
    assert torch.isfinite(out).all()
    export_dense(model, None, tmp_path / "dense")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), x), out,
                               rtol=0, atol=1e-5)
    with pytest.raises(LLMPressError, match="every expert"):
        merge_experts(tiny_moe(arch), [[[0, 1]] + [[e] for e in range(3, 8)]] * 2, stats)


def test_merge_experts_from_the_cli(tmp_path, tiny_tokenizer):
    from llmpress.cli import main
    src = tmp_path / "src"
    tiny_moe("qwen2_moe").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    assert main(["compress", "--model", str(src), "--merge-experts", "0.25", "--method", "rtn", "--bits", "8",
                 "--calib", str(text), "--num-samples", "4", "--seq-len", "32", "--out", str(tmp_path / "o")]) == 0
    import json
    manifest = json.loads((tmp_path / "o" / "llmpress.json").read_text())
    assert manifest["expert_pruning"]["method"] == "mc-smoe" and manifest["expert_pruning"]["experts_after"] == 6
    assert main(["compress", "--model", str(src), "--merge-experts", "0.25", "--prune-experts", "0.25",
                 "--out", str(tmp_path / "x")]) == 2


def test_llama_cpp_target_budget_on_a_moe_gives_each_projections_experts_one_type(tmp_path, tiny_tokenizer):
    """GGUF stacks a layer's experts of one projection into one tensor of one type: the allocator
    treats them as one unit under --target llama.cpp, so the .gguf is written (not refused at the end)."""
    import json
    from llmpress.cli import main
    from llmpress.targets import fused_sets, target_problems
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    args = ["--target", "llama.cpp", "--budget", "bits=5.5", "--menu", "gptq:gguf=q4_k;gptq:gguf=q6_k",
            "--calib", str(text), "--num-samples", "4", "--seq-len", "32", "--sample-windows", "2"]
    for norm in (False, True):        # llama.cpp's qwen3moe always renormalizes: False is refused before any work
        src = tmp_path / f"src{norm}"
        tiny_moe("qwen3_moe", norm_topk_prob=norm).save_pretrained(src)
        tiny_tokenizer.save_pretrained(src)
        code = main(["compress", "--model", str(src), *args, "--out", str(tmp_path / f"o{norm}")])
        assert code == (0 if norm else 2) and (tmp_path / f"o{norm}").exists() == norm
    out = tmp_path / "oTrue"
    layers = json.loads((out / "llmpress.json").read_text())["layers"]
    groups = fused_sets(list(layers), "llama.cpp")
    assert len(groups) == 2 * 3 and all(len(g) == 8 for g in groups)
    for g in groups:
        assert len({json.dumps(layers[n], sort_keys=True) for n in g}) == 1, g
    assert (out / "model.gguf").is_file()
    from llmpress.methods.gptq import GPTQ
    mixed = {n: GPTQ(gguf="q4_k") for n in groups[0]} | {groups[0][0]: GPTQ(gguf="q6_k")}
    problems = target_problems("llama.cpp", mixed, {n: (256, 256) for n in mixed})
    assert len(problems) == 1 and "one tensor" in problems[0]


def _moe_folder(tmp_path, arch, tokenizer):
    src = tmp_path / f"{arch}-hf"
    tiny_moe(arch).save_pretrained(src)
    tokenizer.save_pretrained(src)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return src, text


def _tensors(folder):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "granitemoe"])
def test_offloaded_moe_compress_equals_the_in_memory_one(arch, tmp_path, tiny_tokenizer):
    """Blocks read from the checkpoint's shards one at a time (--offload), experts unfused per
    block (Mixtral's and granitemoe's Hub names and stacking undone): the same stored tensors, bit
    for bit, as compressing the model held in memory."""
    from llmpress.cli import main
    src, text = _moe_folder(tmp_path, arch, tiny_tokenizer)
    args = ["--method", "gptq", "--bits", "4", "--group-size", "128", "--calib", str(text), "--num-samples", "4",
            "--seq-len", "32"]
    assert main(["compress", "--model", str(src), *args, "--out", str(tmp_path / "mem")]) == 0
    assert main(["compress", "--model", str(src), *args, "--offload", str(tmp_path / "off"),
                 "--out", str(tmp_path / "offout")]) == 0
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "offout")
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_gloo_processes_calibrate_a_moe_like_one(tmp_path, tiny_tokenizer):
    """torch.distributed: each rank routes its share of the windows; every expert's statistics and
    token count are summed across ranks, so the experts come out as with one process."""
    import json
    from test_distributed import _compress
    from llmpress.models import load_model
    src, text = _moe_folder(tmp_path, "qwen3_moe", tiny_tokenizer)
    one = _compress(src, tmp_path / "one", text, 1)
    assert one.returncode == 0, one.stderr
    two = _compress(src, tmp_path / "two", text, 2)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    r1 = json.loads((tmp_path / "one" / "llmpress.json").read_text())["report"]
    r2 = json.loads((tmp_path / "two" / "llmpress.json").read_text())["report"]
    experts = [k for k in r1 if ".experts." in k]
    assert experts and [r1[k]["tokens"] for k in experts] == [r2[k]["tokens"] for k in experts]
    a, _ = load_model(str(tmp_path / "one"), runtime="rebuild")
    b, _ = load_model(str(tmp_path / "two"), runtime="rebuild")
    qa = [m.int_weight() for m in a.modules() if hasattr(m, "int_weight")]
    qb = [m.int_weight() for m in b.modules() if hasattr(m, "int_weight")]
    same = sum((x == y).sum().item() for x, y in zip(qa, qb)) / sum(x.numel() for x in qa)
    assert len(qa) == 2 * (4 + 8 * 3) and same > 0.99            # a few codes may flip on float32 sum order
