"""Costs, sensitivity table, allocators and baselines, on the tiny model."""
import copy
import json

import pytest
import torch

from llmpress import LLMPressError
from llmpress.allocate import allocate, knapsack, lagrange, summarize, to_plan, uniform
from llmpress.baselines import effective_rank_ratios, owl_block_sparsity
from llmpress.walk import dense_statistics
from llmpress.arch import adapter_for
from llmpress.config import config_from_dict
from llmpress.methods.rtn import RTN
from llmpress.budget import Budget, Table, measure_sensitivity, menu_configs, option_cost
from llmpress.eval import model_size
from llmpress.pipeline import compress


@pytest.fixture(scope="module")
def table_and_model():
    from conftest import tiny_llama
    model = tiny_llama()
    tokens = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(3))
    menu = menu_configs("gptq,sparsegpt,svd-llm,wanda,rtn")
    # measure_sensitivity itself asserts that every option's cost formula equals the bytes the real
    # compressed module stores
    table = measure_sensitivity(model, tokens, menu, sample_windows=2, progress=False)
    return table, model, tokens


def test_parse_budget():
    assert Budget.parse("params=0.5") == Budget("params", 0.5)
    assert Budget.parse("bits=3") == Budget("bits", 3.0)
    for bad in ("params=1.5", "bits=-1", "size=3", "bits", "bytes=abc"):
        with pytest.raises(LLMPressError):
            Budget.parse(bad)


def test_table_is_complete_and_round_trips(table_and_model, tmp_path):
    table, model, _ = table_and_model
    assert len(table.layers) == 14
    layer = table.layers["model.layers.1.mlp.down_proj"]
    assert layer["options"][0]["label"] == "dense" and layer["options"][0]["error"] == 0
    assert all(o["error"] > 0 for o in layer["options"][1:])
    # more bits, less error
    from llmpress import GPTQ
    errs = {o["label"]: o["error"] for o in layer["options"]}
    assert errs[GPTQ(bits=2).label()] > errs[GPTQ(bits=4).label()] > errs[GPTQ(bits=8).label()]
    table.save(tmp_path / "t.json")
    again = Table.load(tmp_path / "t.json")
    assert again.layers == json.loads(json.dumps(table.layers))


@pytest.mark.parametrize("spec", ["params=0.5", "bits=3.0", "bits=5.0"])
def test_allocators_land_within_one_percent_and_beat_uniform(table_and_model, spec):
    table, _, _ = table_and_model
    budget = Budget.parse(spec)
    k, l = knapsack(table, budget), lagrange(table, budget)
    assert 0.99 <= summarize(table, k, budget)["use_of_budget"] <= 1.0 + 1e-9
    assert summarize(table, l, budget)["use_of_budget"] <= 1.0 + 1e-9
    # the DP is optimal among choices whose cost, rounded up to budget / DP_UNITS per layer, fits in
    # [99 %, 100 %] of the budget: so it beats the Lagrangian choice when that lies in the window
    # with the rounding slack to spare
    from llmpress.allocate import DP_UNITS
    slack = Budget(budget.metric, budget.target * (1 - len(table.layers) / DP_UNITS))
    l_slack = lagrange(table, slack)
    if summarize(table, l_slack, budget)["use_of_budget"] >= 0.99:
        assert summarize(table, k, budget)["predicted_error"] <= summarize(table, l_slack, budget)["predicted_error"] + 1e-12
    from llmpress import GPTQ, SparseGPT
    ref = uniform(table, (SparseGPT(sparsity=0.5) if budget.metric == "params" else GPTQ(bits=3)).label())
    # with the rounding slack added to the budget, the uniform choice is one the DP can represent
    roomy = Budget(budget.metric, budget.target * (1 + len(table.layers) / DP_UNITS))
    if summarize(table, ref, roomy)["use_of_budget"] >= 0.99 and summarize(table, ref, budget)["use_of_budget"] <= 1:
        assert summarize(table, knapsack(table, roomy), budget)["predicted_error"] <= \
            summarize(table, ref, budget)["predicted_error"]


def test_measured_bits_agree_with_the_cost_model(table_and_model):
    table, model, tokens = table_and_model
    budget = Budget.parse("bits=3.0")
    choice = knapsack(table, budget)
    built = copy.deepcopy(model)
    compress(built, to_plan(table, choice).resolve(adapter_for(built).linear_names(built)), tokens, progress=False)
    s = summarize(table, choice, budget)
    size = model_size(built)
    assert size["bytes"] == s["bytes"] and size["bits_per_weight"] == pytest.approx(s["bits_per_weight"])
    assert size["bits_per_weight"] <= 3.0


def test_budget_below_reach_is_refused(table_and_model):
    table, _, _ = table_and_model
    with pytest.raises(LLMPressError, match="below what the menu can reach"):
        knapsack(table, Budget.parse("bits=0.5"))


def test_search_keeps_the_budget_and_does_not_get_worse(table_and_model):
    table, model, tokens = table_and_model
    budget = Budget.parse("params=0.6")
    held_out = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(9))
    choice, info = allocate(table, budget, "search", model=model, stats_tokens=tokens, eval_tokens=held_out,
                            steps=6, progress=False)
    assert info["use_of_budget"] <= 1.0 + 1e-9 and set(choice) == set(table.layers)


def test_tail_kl_from_a_block_equals_the_full_forward(table_and_model):
    """Skipping the blocks before a switched layer (their inputs cached) gives the same KL as
    running the whole switched model; and the KL sees the switch."""
    from llmpress.search import _Assembly, _Tail
    table, model, tokens = table_and_model
    asm = _Assembly(table, model, tokens)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(9))
    tail = _Tail(asm, model, windows)
    assert tail.refresh() == pytest.approx(0.0, abs=1e-6)           # every layer dense
    name = "model.layers.1.mlp.down_proj"
    oi = uniform(table, "sparsegpt:sparsity=0.7,damp=0.01")[name]
    asm.set(name, oi)
    skipped = tail.kl_from(1)
    assert skipped > 1e-5
    assert skipped == pytest.approx(tail.refresh(), rel=1e-5)
    assert tail.kl_from(0) == pytest.approx(skipped, rel=1e-5)


def test_refine_keeps_the_budget_and_lowers_the_measured_kl(table_and_model, capsys):
    from llmpress.search import _Assembly, _Tail, neighbours
    table, model, tokens = table_and_model
    budget = Budget.parse("params=0.6")
    held_out = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(9))
    start = knapsack(table, budget)
    choice, info = allocate(table, budget, "refine", model=model, stats_tokens=tokens, eval_tokens=held_out,
                            rounds=2, progress=False)
    assert set(choice) == set(table.layers) and 0.99 <= info["use_of_budget"] <= 1.0 + 1e-9
    assert "refine round 1" in capsys.readouterr().out
    # each layer moved at most one level per round
    for n in table.layers:
        reach = {start[n], *neighbours(table, n, start[n])}
        reach |= {j for i in reach for j in neighbours(table, n, i)}
        assert choice[n] in reach
    asm = _Assembly(table, model, tokens)
    tail = _Tail(asm, model, held_out)

    def kl(ch):
        for n, i in ch.items():
            asm.set(n, i)
        return tail.refresh()
    assert kl(choice) < kl(start)               # it moved layers, and the move helped


def test_neighbours_are_the_adjacent_levels(table_and_model):
    from llmpress.search import neighbours
    table, _, _ = table_and_model
    name = "model.layers.0.self_attn.q_proj"
    labels = [o["label"] for o in table.layers[name]["options"]]
    at = labels.index("sparsegpt:sparsity=0.5,damp=0.01")
    assert sorted(labels[i] for i in neighbours(table, name, at)) == ["sparsegpt:sparsity=0.4,damp=0.01",
                                                                       "sparsegpt:sparsity=0.6,damp=0.01"]
    top = [labels[i] for i in neighbours(table, name, labels.index("sparsegpt:sparsity=0.1,damp=0.01"))]
    assert sorted(top) == ["dense", "sparsegpt:sparsity=0.2,damp=0.01"]
    assert "sparsegpt:sparsity=0.1,damp=0.01" in [labels[i] for i in neighbours(table, name, 0)]


def test_owl_and_effective_rank_baselines(table_and_model):
    _, model, tokens = table_and_model
    stats = dense_statistics(model, tokens)
    s = owl_block_sparsity(model, stats, 0.5, lamda=0.08)
    assert len(s) == 2 and sum(s) / 2 == pytest.approx(0.5) and max(s) - min(s) <= 0.16 + 1e-9
    ratios = effective_rank_ratios(model, stats, 0.5)
    names = adapter_for(model).linear_names(model)
    params = {n: model.get_submodule(n).weight.numel() for n in names}
    kept = sum(ratios[n] * params[n] for n in names) / sum(params.values())
    assert kept == pytest.approx(0.5, rel=0.01) and all(0 < r < 1 for r in ratios.values())


def test_cli_budget_reuses_the_sensitivity_table(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    from llmpress import budget as budget_mod
    from llmpress.cli import main
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 600)
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))
    args = ["compress", "--model", str(tiny_hf_dir), "--calib", str(text), "--num-samples", "4", "--seq-len", "32",
            "--sample-windows", "2", "--menu", "gptq,sparsegpt"]
    assert main(args + ["--budget", "bits=4", "--out", str(tmp_path / "a"), "--json", str(tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["bits_per_weight"] <= 4.0 and first["allocation"]["use_of_budget"] >= 0.99
    assert (tmp_path / "a" / "allocation.png").stat().st_size > 1000

    def boom(*a, **k):
        raise AssertionError("sensitivity re-measured")
    monkeypatch.setattr(budget_mod, "measure_sensitivity", boom)
    assert main(args + ["--budget", "bits=6", "--out", str(tmp_path / "b"), "--json", str(tmp_path / "b.json")]) == 0
    assert "sensitivity table read from" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "b" / "llmpress.json").read_text())
    assert manifest["allocation"]["budget"] == "bits=6" and len(manifest["plan"]["rules"]) == 14


def test_block_output_grads_are_the_loss_gradient():
    """The Fisher weights come from d(sum of next-token NLL)/d(block output): checked against a
    central finite difference of the loss along a random direction added to one block's output."""
    import torch.nn.functional as F
    from conftest import tiny_llama
    from llmpress.budget import block_output_grads
    model = tiny_llama(layers=3).double()
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    blocks = adapter_for(model).blocks(model)
    from llmpress.walk import BlockWalk
    grads = block_output_grads(BlockWalk(model, progress=False), windows)
    assert len(grads) == 3 and grads[1].shape == (2, 16, 64)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())   # flags restored, no grads
    direction = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss_with(eps):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            return h + eps * direction[k]
        handle = blocks[1].register_forward_hook(hook)
        try:
            total = 0.0
            for k, w in enumerate(windows):
                logits = model(w[None], use_cache=False).logits[0, :-1]
                total += F.cross_entropy(logits, w[1:], reduction="sum").item()
        finally:
            handle.remove()
        return total
    eps = 1e-5
    numeric = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
    analytic = (grads[1].double() * direction).sum().item()
    assert numeric == pytest.approx(analytic, rel=1e-3)


def test_restricted_table_allocates_along_one_axis(table_and_model):
    table, _, _ = table_and_model
    sparse = table.restricted(["sparsegpt"])
    choice, info = allocate(sparse, Budget.parse("params=0.6"), "knapsack")
    assert set(info["methods"]) <= {"dense", "sparsegpt"} and abs(info["use_of_budget"] - 1) <= 0.01
    with pytest.raises(LLMPressError):
        table.restricted(["awq"])


def test_fused_layers_share_one_choice(table_and_model):
    from llmpress.allocate import fused_groups
    table, model, _ = table_and_model
    groups = fused_groups(model)
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in groups
    budget = Budget.parse("bits=4")
    for alloc in ("knapsack", "lagrange"):
        choice, info = allocate(table, budget, alloc, fuse_groups=groups)
        assert list(choice) == list(table.layers) and info["fused"]
        for g in groups:
            assert len({choice[m] for m in g}) == 1, g
        assert 0.99 <= info["use_of_budget"] <= 1.0
        # a constraint can only cost predicted error
        free = summarize(table, allocate(table, budget, alloc)[0], budget)["predicted_error"]
        if alloc == "knapsack":
            assert info["predicted_error"] >= free * (1 - 1e-3)     # up to the DP's cost rounding
    with pytest.raises(LLMPressError):
        allocate(table, budget, "search", fuse_groups=groups)


def test_errors_are_the_fisher_forms_of_the_block_output_change():
    """error = 1/2 sum_t (g_t . d_t)^2 / tokens and error_diag = 1/2 sum_t,c g_tc^2 d_tc^2 / tokens,
    with d the change in the layer's own block output when only that layer is compressed, and
    g = d loss / d block output: recomputed here from the model directly."""
    from conftest import tiny_llama
    from llmpress import SparseGPT
    from llmpress.budget import block_output_grads
    from llmpress.config import handler_for
    from llmpress.walk import BlockWalk
    model = tiny_llama(layers=2)
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    config = SparseGPT(sparsity=0.6)
    table = measure_sensitivity(model, tokens, [config], sample_windows=2, progress=False)
    blocks = adapter_for(model).blocks(model)
    # g by plain autograd through the whole model (the table walks the blocks backwards instead)
    seen = []

    def keep_grad(module, args, out):
        (out[0] if isinstance(out, tuple) else out).register_hook(seen.append)
    hook = blocks[1].register_forward_hook(keep_grad)
    embed = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    for w in tokens[:2]:
        logits = model(w[None], use_cache=False).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").backward()
    hook.remove()
    embed.remove()
    model.zero_grad(set_to_none=True)
    g = torch.cat(seen).double()
    assert torch.allclose(block_output_grads(BlockWalk(model, progress=False), tokens[:2])[1].double(), g, atol=1e-6)
    walk = BlockWalk(model, progress=False)
    hidden = walk.capture(tokens)
    with torch.no_grad():
        hidden = walk.run(blocks[0], hidden)
        y, stats = walk.collect(blocks[1], hidden, walk.all_heads())
        linear = blocks[1].mlp.up_proj
        blocks[1].mlp.up_proj = handler_for(config)(linear, config, stats["mlp.up_proj"])[0]
        d = (walk.run(blocks[1], hidden[:2]) - y[:2]).double()
        blocks[1].mlp.up_proj = linear
    option = table.layers["model.layers.1.mlp.up_proj"]["options"][1]
    tokens_used = 2 * 15                     # the last position predicts nothing
    assert option["error"] == pytest.approx(0.5 * (g * d).sum(-1).square().sum().item() / tokens_used, rel=1e-4)
    assert option["error_diag"] == pytest.approx(0.5 * (g * d).square().sum().item() / tokens_used, rel=1e-4)
    assert option["error"] > 0 and option["error"] != pytest.approx(option["error_diag"])
    assert table.with_error("error_diag").layers["model.layers.1.mlp.up_proj"]["options"][1]["error"] == option["error_diag"]
    with pytest.raises(LLMPressError):
        table.with_error("no_such_field")


def test_block_index_of_a_layer_name(table_and_model):
    _, model, _ = table_and_model
    adapter = adapter_for(model)
    assert [adapter.block_index(n) for n in adapter.linear_names(model)][::7] == [0, 1]
    with pytest.raises(LLMPressError, match="not inside"):
        adapter.block_index("lm_head")


def test_merged_tables_equal_one_measurement_of_both_menus(table_and_model):
    from llmpress import GPTQLUT
    table, model, tokens = table_and_model
    extra = [GPTQLUT(bits=2)]
    other = measure_sensitivity(model, tokens, extra, sample_windows=2, progress=False)
    both = table.merged(other)
    name = "model.layers.1.self_attn.o_proj"
    labels = [o["label"] for o in both.layers[name]["options"]]
    assert labels.count("dense") == 1 and labels[-1] == extra[0].label()
    assert len(labels) == len(table.layers[name]["options"]) + 1
    assert both.layers[name]["options"][-1] == other.layers[name]["options"][1]
    choice, info = allocate(both, Budget.parse("bits=2.5"), "knapsack")
    assert abs(info["use_of_budget"] - 1) <= 0.02
    fewer = measure_sensitivity(model, tokens[:3], extra, sample_windows=2, progress=False)
    with pytest.raises(LLMPressError, match="tokens"):
        table.merged(fewer)
    with pytest.raises(LLMPressError, match="share an option"):
        both.merged(other)


def test_sensitivity_of_some_layers_equals_their_rows_of_the_full_table(table_and_model):
    table, model, tokens = table_and_model
    names = {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"}
    menu = [config_from_dict(c) for c in table.meta["menu"]]
    some = measure_sensitivity(model, tokens, menu, sample_windows=2, progress=False, only=names)
    assert set(some.layers) == names
    for n in names:
        assert [o["error"] for o in some.layers[n]["options"]] == pytest.approx(
            [o["error"] for o in table.layers[n]["options"]], rel=1e-6)
    with pytest.raises(LLMPressError, match="not compressible"):
        measure_sensitivity(model, tokens, [RTN(bits=4)], sample_windows=2, progress=False, only={"lm_head"})


def test_table_rows_are_cached_per_option(table_and_model, tmp_path, monkeypatch):
    """A menu that adds an option to a measured one measures that option's rows only; the table
    assembled from cached rows equals one measured with the whole menu at once."""
    from llmpress import budget as budget_mod
    whole, model, tokens = table_and_model
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path))
    first, added = menu_configs("gptq,sparsegpt"), menu_configs("rtn")
    budget_mod.sensitivity_table(model, tokens, first, 2, progress=False)
    measured = []
    real = budget_mod.measure_sensitivity

    def spy(model, tokens, menu, **kw):
        measured.append([c.label() for c in menu])
        return real(model, tokens, menu, **kw)
    monkeypatch.setattr(budget_mod, "measure_sensitivity", spy)
    table, path = budget_mod.sensitivity_table(model, tokens, added + first, 2, progress=False)
    assert measured == [[c.label() for c in added]] and path.is_file()
    assert table.meta["measured"] == [c.label() for c in added] and len(table.meta["reused"]) == len(first)
    labels = {c.label() for c in first + added}
    for name, layer in table.layers.items():
        expect = {o["label"]: o for o in whole.layers[name]["options"] if o["label"] in labels | {"dense"}}
        assert {o["label"]: o for o in layer["options"]} == expect
    assert [o["label"] for o in table.layers[name]["options"]] == ["dense"] + [c.label() for c in added + first]
    again, _ = budget_mod.sensitivity_table(model, tokens, first + added, 2, progress=False)   # another order
    assert len(measured) == 1 and again.meta["measured"] == []


def test_tail_linears_measured_on_the_tail_alone_give_the_whole_blocks_numbers(table_and_model, monkeypatch):
    """The MLP's linears' rows come from running the MLP alone on its recorded inputs (the block
    adds its output to the residual stream last): the same errors as running the whole block."""
    import dataclasses
    from llmpress import arch
    table, model, tokens = table_and_model
    assert arch.adapter_for(model).tail == "mlp"
    monkeypatch.setitem(arch.ADAPTERS, "llama", dataclasses.replace(arch.ADAPTERS["llama"], tail=None))
    whole = measure_sensitivity(model, tokens, menu_configs("gptq,sparsegpt,svd-llm,wanda,rtn"), sample_windows=2,
                                progress=False)
    mlp = [n for n in table.layers if ".mlp." in n]
    assert mlp and table.layers.keys() == whole.layers.keys()
    for name in table.layers:
        for a, b in zip(table.layers[name]["options"], whole.layers[name]["options"]):
            assert a["label"] == b["label"] and a["bytes"] == b["bytes"]
            for field in ("error", "error_diag", "block_error"):
                assert a[field] == pytest.approx(b[field], rel=1e-4, abs=1e-12), (name, a["label"], field)


@pytest.mark.parametrize("spec", ["rtn:bits=3,group_size=32", "rtn:gguf=q4_k", "rtn:bits=4,group_size=32,clip=mse",
                                  "gptq:bits=3,group_size=32", "gptq:bits=4,group_size=0,clip=mse",
                                  "gptq:gguf=q3_k,clip=search", "gptq:gguf=iq3_xxs", "gptq:bits=4,refine=1"])
def test_rows_independent_methods_give_a_row_subset_exactly_those_rows(spec):
    """What the estimated table relies on: a subset of a layer's rows compressed alone comes out
    as exactly those rows of the whole layer's result."""
    from llmpress.budget import _row_subset, _sample_rows
    from llmpress.config import handler_for
    from llmpress.stats import InputStats
    config = menu_configs(spec)[0]
    assert config.rows_independent()
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 256, generator=g) * 0.05)
    stats = InputStats(256)
    stats.add(torch.randn(512, 256, generator=g) * torch.linspace(0.2, 3, 256))
    whole = handler_for(config)(linear, config, stats)[0].dense_weight()
    rows = _sample_rows(96, "blocks.0.q_proj")
    assert len(rows) == 32 and torch.equal(rows, rows.sort().values)
    part = handler_for(config)(_row_subset(linear, rows), config, stats)[0].dense_weight()
    assert torch.equal(part, whole[rows])
    assert not torch.equal(part, linear.weight[rows])          # it did compress them


def test_methods_with_decisions_across_rows_are_not_rows_independent():
    from llmpress.config import parse_options
    for spec in ("gptq:bits=4,refit=2", "gptq-lut:bits=3", "gptq-vq", "sparsegpt", "svd-llm", "awq", "wanda"):
        name, _, opts = spec.partition(":")
        assert not config_from_dict({"method": name, **parse_options(opts, spec)}).rows_independent(), spec


def test_estimated_table_measures_only_each_layers_cheapest_option(table_and_model, tmp_path, monkeypatch):
    """estimate=True: the cheapest option of each layer is measured exactly as in the measured
    table; the others' errors are their local error times that option's error / local error; one
    block run per layer; the estimate is cached apart from measured tables and never used for one."""
    from llmpress import budget as budget_mod
    _, model, tokens = table_and_model
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path))
    menu = menu_configs("gptq:bits=4,group_size=32;gptq:bits=3,group_size=32;gptq:bits=8,group_size=0;svd-llm")
    measured, _ = budget_mod.sensitivity_table(model, tokens, menu, 2, progress=False)
    runs = []
    real_run = budget_mod._run_module
    monkeypatch.setattr(budget_mod, "_run_module", lambda *a: runs.append(1) or real_run(*a))
    from llmpress.walk import BlockWalk
    real_block = BlockWalk.run
    monkeypatch.setattr(BlockWalk, "run", lambda self, *a, **k: runs.append(1) or real_block(self, *a, **k))
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "fresh"))
    est, path = budget_mod.sensitivity_table(model, tokens, menu, 2, progress=False, estimate=True)
    assert est.meta["estimate"] and est.meta["estimated_rows"] == sum(len(v["options"]) - 2 for v in est.layers.values())
    blocks = len({n.split(".self_attn.")[0].split(".mlp.")[0] for n in est.layers})
    # one block (or MLP) run per layer, plus per block: its MLP's inputs captured, a forward for the gradients
    assert len(runs) == len(est.layers) + 2 * blocks
    bpp = measured.meta["dense_bytes_per_param"]
    for name, layer in est.layers.items():
        m = {o["label"]: o for o in measured.layers[name]["options"]}
        e = {o["label"]: o for o in layer["options"]}
        assert m.keys() == e.keys()
        anchor = budget_mod._anchor(menu, layer["out"], layer["in"], bpp).label()
        assert anchor == "gptq:bits=3,group_size=32,symmetric=True,act_order=True,damp=0.01" or "svd" in anchor
        assert e[anchor] == m[anchor]                              # measured, bit for bit
        ratio = m[anchor]["error"] / m[anchor]["local_error"]
        for label, o in e.items():
            if label not in (anchor, "dense"):
                assert o["estimated"] and o["error"] == pytest.approx(ratio * o["local_error"], rel=1e-12)
                assert "error" not in {k for k, v in o.items() if v is None}
        svd = next(lab for lab in e if lab.startswith("svd-llm"))
        if svd != anchor:                                         # solved whole (rows not independent): exact local
            assert e[svd]["local_error"] == pytest.approx(m[svd]["local_error"], rel=1e-9)
    # the measured table (cached) is not replaced by estimated rows, nor they used for a measured one
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path))
    again, _ = budget_mod.sensitivity_table(model, tokens, menu, 2, progress=False)
    assert again.layers == measured.layers
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "fresh"))
    runs.clear()
    full, _ = budget_mod.sensitivity_table(model, tokens, menu, 2, progress=False)
    assert not full.meta.get("estimated_rows") and len(runs) > len(est.layers) + 2 * blocks
    for name in full.layers:
        assert [o["error"] for o in full.layers[name]["options"]] == pytest.approx(
            [o["error"] for o in measured.layers[name]["options"]], rel=1e-9)


def test_layers_with_biases_cost_their_bias_too():
    """Qwen2's q/k/v carry biases, stored beside the compressed weight: the table's bytes are the
    module's stored bytes (measure_sensitivity asserts it for every option) and its dense row's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    table = measure_sensitivity(model, tokens, menu_configs("rtn:bits=4,group_size=32"), sample_windows=2, progress=False)
    q = table.layers["model.layers.0.self_attn.q_proj"]
    dense, rtn = q["options"]
    assert dense["bytes"] == 64 * 65 * 4 and rtn["bytes"] == RTN(bits=4, group_size=32).storage(64, 64)[0] + 2 * 64
    o = table.layers["model.layers.0.self_attn.o_proj"]["options"][1]
    assert o["bytes"] == RTN(bits=4, group_size=32).storage(64, 64)[0]                    # no bias
