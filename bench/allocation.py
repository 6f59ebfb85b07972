"""Issue 5 experiment: one budget allocated across layers and methods vs uniform and single-axis
baselines, on the embedded model (calibration 64 x 512 from `wikipedia`, seed 0; perplexity on
WikiText-2, seq_len 2048, first 20 windows). Every model is built with the same sequential pipeline.

    .venv/bin/python bench/allocation.py [--out bench/results/allocation.json] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress import GPTQ, SVDLLM, SparseGPT, Plan  # noqa: E402
from llmpress.allocate import allocate, to_plan  # noqa: E402
from llmpress.baselines import effective_rank_ratios, owl_block_sparsity  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.budget import Budget, menu_configs, option_cost, plan_for_budget, sensitivity_table  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import model_size, perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402
from llmpress.report import plot_allocation  # noqa: E402
from llmpress.walk import dense_statistics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "allocation.json"))
    ap.add_argument("--table", default=str(ROOT / "bench" / ".cache" / "sensitivity-v3-gptq-sparsegpt-svdllm.json"))
    ap.add_argument("--only", help="comma-separated run names")
    ap.add_argument("--search-steps", type=int, default=30)
    ap.add_argument("--refine-rounds", type=int, default=1)
    ap.add_argument("--sample-windows", type=int, default=16)
    ap.add_argument("--dense-ppl", type=float, help="dense perplexity measured earlier (skips re-measuring)")
    a = ap.parse_args()

    dense, tok = load_model("smollm2-135m")
    names = adapter_for(dense).linear_names(dense)
    tokens = calibration_tokens(tok, "wikipedia", 64, 512, seed=0)
    held_out = calibration_tokens(tok, "wikipedia", 68, 512, seed=0)[-4:]
    ids = eval_tokens(tok, "wikitext2")
    menu = menu_configs("gptq,sparsegpt,svd-llm")
    table, _ = sensitivity_table(dense, tokens, menu, a.sample_windows, a.table)
    print(f"sensitivity table: {table.meta['seconds']:.0f}s to measure", flush=True)
    stats = None

    def dense_stats():
        nonlocal stats
        if stats is None:
            stats = dense_statistics(dense, tokens)
        return stats

    runs: dict[str, dict] = {}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():
        runs = json.loads(out.read_text())["runs"]
    dense_ppl = a.dense_ppl or runs.get("dense", {}).get("perplexity") or \
        perplexity(dense, ids, 2048, 20, progress=False)["perplexity"]
    runs["dense"] = {"perplexity": dense_ppl, "source": "--dense-ppl" if a.dense_ppl else "measured"}

    p05 = Budget.parse("params=0.5")
    # uniform GPTQ 3-bit at group 128 measures 3 + 16 / 128 (+ the shorter last group of the 576-column
    # layers): the allocator gets exactly that measured size, and also the round 3.0
    gptq3_bits = 8 * sum(option_cost(GPTQ(bits=3), layer["out"], layer["in"], 4)[0] for layer in table.layers.values()) \
        / sum(layer["params"] for layer in table.layers.values())
    predicted = {}
    for spec in (p05, Budget("bits", gptq3_bits), Budget.parse("bits=3.0")):
        for alloc in ("knapsack", "lagrange"):
            choice, info = allocate(table, spec, alloc)
            predicted[f"{spec.metric}={spec.target:.4f}/{alloc}"] = info
    print(json.dumps(predicted, indent=1), flush=True)

    def planned(spec: Budget, allocator: str):
        """The library call the CLI makes (the table read back from its file)."""
        def build():
            r = plan_for_budget(dense, tokens, spec, menu, allocator, held_out=held_out, table_path=a.table,
                                sample_windows=a.sample_windows, search_steps=a.search_steps,
                                refine_rounds=a.refine_rounds, progress=False)
            return r.plan, (r.choice, r.info, r.table)
        return build

    def allocated(spec: Budget, allocator: str, table):
        """A variant of the table (restricted menu, another error estimate), allocated directly."""
        def build():
            choice, info = allocate(table, spec, allocator)
            return to_plan(table, choice), (choice, info, table)
        return build

    def owl():
        s = owl_block_sparsity(dense, dense_stats(), 0.5)
        return Plan([(f"model.layers.{i}.*", SparseGPT(sparsity=round(x, 4))) for i, x in enumerate(s)]), None

    def erank():
        ratios = effective_rank_ratios(dense, dense_stats(), 0.5)
        return Plan([(n, SVDLLM(param_ratio=round(r, 4))) for n, r in ratios.items()]), None

    # in order of priority: the later ones are the cheapest to leave out
    plans = [
        ("params0.5/knapsack", planned(p05, "knapsack")),
        ("params0.5/owl-sparsegpt", owl),
        ("params0.5/effective-rank-svd-llm", erank),
        ("bits3/uniform-gptq-3", lambda: (Plan.uniform(GPTQ(bits=3, group_size=128)), None)),
        (f"bits{gptq3_bits:.3f}/knapsack", planned(Budget("bits", gptq3_bits), "knapsack")),
        ("bits3.0/knapsack", planned(Budget.parse("bits=3.0"), "knapsack")),
        ("params0.5/search", planned(p05, "search")),
        ("params0.5/refine", planned(p05, "refine")),
        ("params0.5/uniform-sparsegpt-0.5", lambda: (Plan.uniform(SparseGPT(sparsity=0.5)), None)),
        ("params0.5/lagrange", planned(p05, "lagrange")),
        # one axis at a time, against the single-axis baselines above (same table, fewer options)
        ("params0.5/knapsack-sparsegpt-only", allocated(p05, "knapsack", table=table.restricted(["sparsegpt"]))),
        ("params0.5/knapsack-svd-llm-only", allocated(p05, "knapsack", table=table.restricted(["svd-llm"]))),
        # the same table allocated with the diagonal-Fisher estimate (the previous default)
        ("params0.5/knapsack-diag-fisher", allocated(p05, "knapsack", table=table.with_error("error_diag"))),
        (f"bits{gptq3_bits:.3f}/knapsack-diag-fisher", allocated(Budget("bits", gptq3_bits), "knapsack",
                                                              table=table.with_error("error_diag"))),
    ]

    only = set(a.only.split(",")) if a.only else None
    for name, make in plans:
        if (only and name not in only) or name in runs:
            continue
        plan, alloc = make()
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        rep = compress(model, plan.resolve(names), tokens, progress=False)
        size = model_size(model)
        ppl = perplexity(model, ids, 2048, 20, progress=False)["perplexity"]
        params_kept = sum(_kept(model.get_submodule(n)) for n in names) / size["params"]
        runs[name] = {"perplexity": ppl, "delta": ppl - dense_ppl, "bits_per_weight": size["bits_per_weight"],
                      "bytes": size["bytes"], "params_kept": params_kept, "compress_seconds": rep.seconds,
                      "allocation": alloc[1] if alloc else None}
        if alloc:
            safe = name.replace("/", "_")
            plot_allocation(alloc[2], alloc[0], ROOT / "bench" / "results" / f"allocation_{safe}.png", name)
        print(f"{name:<36} ppl {ppl:9.3f} (+{ppl - dense_ppl:8.3f})  params kept {params_kept:.4f}  "
              f"bits/weight {size['bits_per_weight']:.3f}  ({time.perf_counter() - t:.0f}s)", flush=True)
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "predicted": predicted, "runs": runs}, indent=1))
        del model


def _kept(m) -> int:
    from llmpress.modules import LowRankLinear, SparseLinear
    if isinstance(m, SparseLinear):
        return m.values.numel()
    if isinstance(m, LowRankLinear):
        return m.rank * (m.in_features + m.out_features)
    return m.in_features * m.out_features


if __name__ == "__main__":
    main()
