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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress import GPTQ, SVDLLM, SparseGPT, Plan  # noqa: E402
from llmpress.allocate import (_dense_stats, allocate, effective_rank_ratios, owl_block_sparsity,  # noqa: E402
                               plot_allocation, summarize, to_plan)
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.budget import Budget, Table, measure_sensitivity, menu_configs, table_key  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import model_size, perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "allocation.json"))
    ap.add_argument("--table", default=str(ROOT / "bench" / ".cache" / "sensitivity-gptq-sparsegpt-svdllm.json"))
    ap.add_argument("--only", help="comma-separated run names")
    ap.add_argument("--search-steps", type=int, default=30)
    a = ap.parse_args()

    dense, tok = load_model("smollm2-135m")
    names = adapter_for(dense).linear_names(dense)
    tokens = calibration_tokens(tok, "wikipedia", 64, 512, seed=0)
    held_out = calibration_tokens(tok, "wikipedia", 68, 512, seed=0)[-4:]
    ids = eval_tokens(tok, "wikitext2")
    menu = menu_configs("gptq,sparsegpt,svd-llm")
    key = table_key(dense, tokens, menu, 4)
    if Path(a.table).is_file() and Table.load(a.table).meta.get("key") == key:
        table = Table.load(a.table)
    else:
        table = measure_sensitivity(dense, tokens, menu, sample_windows=4)
        table.meta["key"] = key
        Path(a.table).parent.mkdir(parents=True, exist_ok=True)
        table.save(a.table)
    print(f"sensitivity table: {table.meta['seconds']:.0f}s to measure", flush=True)
    stats = None

    def dense_stats():
        nonlocal stats
        if stats is None:
            stats = _dense_stats(dense, tokens)
        return stats

    runs: dict[str, dict] = {}
    out = Path(a.out)
    if out.is_file():
        runs = json.loads(out.read_text())["runs"]
    dense_ppl = runs.get("dense", {}).get("perplexity") or perplexity(dense, ids, 2048, 20, progress=False)["perplexity"]
    runs["dense"] = {"perplexity": dense_ppl}

    def plans():
        p05, b3 = Budget.parse("params=0.5"), Budget.parse("bits=3.0")
        yield "params0.5/uniform-sparsegpt-0.5", Plan.uniform(SparseGPT(sparsity=0.5)), None
        owl = owl_block_sparsity(dense, dense_stats(), 0.5)
        yield "params0.5/owl-sparsegpt", Plan([(f"model.layers.{i}.*", SparseGPT(sparsity=round(s, 4)))
                                              for i, s in enumerate(owl)]), None
        ratios = effective_rank_ratios(dense, dense_stats(), 0.5)
        yield "params0.5/effective-rank-svd-llm", Plan([(n, SVDLLM(param_ratio=round(r, 4))) for n, r in ratios.items()]), None
        for alloc in ("knapsack", "lagrange"):
            choice, info = allocate(table, p05, alloc)
            yield f"params0.5/{alloc}", to_plan(table, choice), (choice, info)
        choice, info = allocate(table, p05, "search", model=dense, stats_tokens=tokens, eval_tokens=held_out,
                                steps=a.search_steps)
        yield "params0.5/search", to_plan(table, choice), (choice, info)
        yield "bits3/uniform-gptq-3", Plan.uniform(GPTQ(bits=3, group_size=128)), None
        yield "bits3/uniform-gptq-4", Plan.uniform(GPTQ(bits=4, group_size=128)), None
        for alloc in ("knapsack", "lagrange"):
            choice, info = allocate(table, b3, alloc)
            yield f"bits3/{alloc}", to_plan(table, choice), (choice, info)

    only = set(a.only.split(",")) if a.only else None
    for name, plan, alloc in plans():
        if only and name not in only:
            continue
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
            plot_allocation(table, alloc[0], ROOT / "bench" / "results" / f"allocation_{safe}.png", name)
        print(f"{name:<36} ppl {ppl:9.3f} (+{ppl - dense_ppl:8.3f})  params kept {params_kept:.4f}  "
              f"bits/weight {size['bits_per_weight']:.3f}  ({time.perf_counter() - t:.0f}s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "runs": runs}, indent=1))
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
