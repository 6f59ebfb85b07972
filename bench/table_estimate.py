"""Issue 25: the estimated sensitivity table (`--estimate-sensitivity`) against the measured one, on
the embedded SmolLM2-135M (float32), same calibration windows (`wikipedia`, 64 x 512, seed 0; 16
sample windows) and the target's default menu.

Estimated: each layer's cheapest option is measured in full (solve + block run); every other
option is solved on 1/8 of the rows (rows-independent methods) and its error is its layer error
tr(dW H dW^T) times the cheapest option's ratio of Fisher error to layer error (llmpress.budget).

Measured here: both tables' seconds by phase; for the estimated rows the ratio estimate/measured
(median and 90th percentile of |log ratio|) and the share of option pairs of a layer in the same
order; the knapsack allocation at --budget from each table (fused groups for vLLM), the measured
table's predicted loss of both allocations and the share of layers given the same option; with
--compress, both plans compressed and their WikiText-2 perplexity (2048 x --windows); with
--baseline, a uniform GPTQ W4 g64 compress of the same model (the issue's unit of time).

    .venv/bin/python bench/table_estimate.py [--target vllm] [--budget bits=4.5] [--compress] [--baseline]
        [--no-measured]   # llama.cpp's 12-option menu: the measured table takes over an hour
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress.allocate import allocate, fused_groups, to_plan  # noqa: E402
from llmpress.budget import Budget, menu_configs, sensitivity_table  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.targets import default_recipe  # noqa: E402


def compare(measured, estimated) -> dict:
    logs, same, pairs = [], 0, 0
    for name, layer in estimated.layers.items():
        m = {o["label"]: o["error"] for o in measured.layers[name]["options"]}
        est = [o for o in layer["options"] if o.get("estimated")]
        for o in est:
            if m[o["label"]] > 0 and o["error"] > 0:
                logs.append(abs(math.log(o["error"] / m[o["label"]])))
        opts = [o for o in layer["options"] if o["label"] != "dense"]
        for i in range(len(opts)):
            for j in range(i + 1, len(opts)):
                a, b = opts[i]["label"], opts[j]["label"]
                pairs += 1
                same += (opts[i]["error"] < opts[j]["error"]) == (m[a] < m[b])
    logs.sort()
    return {"estimated_rows": len(logs), "median_abs_log_ratio": logs[len(logs) // 2],
            "p90_abs_log_ratio": logs[int(0.9 * len(logs))], "pairs_in_order": same / max(pairs, 1)}


def predicted(table, choice) -> float:
    return sum(table.layers[n]["options"][k]["error"] for n, k in choice.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="vllm")
    ap.add_argument("--budget", default="bits=4.5")
    ap.add_argument("--compress", action="store_true")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--no-measured", action="store_true")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--cache", help="LLMPRESS_CACHE for the measured table (default: a fresh folder)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/table_estimate.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    recipe = default_recipe(a.target, "bits")
    menu = menu_configs(recipe["menu"])
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    tokens = calibration_tokens(tok, "wikipedia", 64, 512, 0)
    budget = Budget.parse(a.budget)
    extra = {"fuse_groups": fused_groups(model)} if a.target == "vllm" else {}
    os.environ["LLMPRESS_CACHE"] = a.cache or tempfile.mkdtemp(prefix="llmpress-measured-")
    row: dict = {"target": a.target, "budget": a.budget, "menu": recipe["menu"], "date": time.strftime("%Y-%m-%d")}
    tables = {}
    for kind in ("estimated",) + (() if a.no_measured else ("measured",)):
        if kind == "estimated":
            cache = os.environ["LLMPRESS_CACHE"]
            os.environ["LLMPRESS_CACHE"] = tempfile.mkdtemp(prefix="llmpress-estimate-")   # nothing reused
        t = time.perf_counter()
        table, _ = sensitivity_table(model, tokens, menu, 16, estimate=kind == "estimated")
        if kind == "estimated":
            os.environ["LLMPRESS_CACHE"] = cache
        tables[kind] = table
        choice, info = allocate(table, budget, "knapsack", **extra)
        row[kind] = {"seconds": table.meta["seconds"] or time.perf_counter() - t,
                     "phase_seconds": table.meta.get("phase_seconds"), "bits_per_weight": info["bits_per_weight"],
                     "predicted_by_own_table": info["predicted_error"], "choice": choice}
        print(kind, json.dumps({k: v for k, v in row[kind].items() if k != "choice"}), flush=True)
    if "measured" in tables:
        row["agreement"] = compare(tables["measured"], tables["estimated"])
        m, e = row["measured"]["choice"], row["estimated"]["choice"]
        row["agreement"].update({"same_choice": sum(m[n] == e[n] for n in m) / len(m),
                                 "measured_loss_of_measured_plan": predicted(tables["measured"], m),
                                 "measured_loss_of_estimated_plan": predicted(tables["measured"], e)})
        print("agreement", json.dumps(row["agreement"]), flush=True)
    if a.compress or a.baseline:
        from llmpress.workflow import compress
        ids = eval_tokens(tok, "wikitext2")
        runs = {kind: {"plan": to_plan(tables[kind], row[kind]["choice"]).to_dict()} for kind in tables} if a.compress else {}
        if a.baseline:
            runs["uniform-gptq-w4g64"] = {"method": "gptq", "bits": 4, "group_size": 64}
        for kind, fields in runs.items():
            with tempfile.TemporaryDirectory() as tmp:
                result = compress("smollm2-135m", Path(tmp) / "out", None, target=a.target if "plan" in fields else "llmpress",
                                  calib="wikipedia", num_samples=64, seq_len=512, **fields)
                loaded, _ = load_model(str(Path(tmp) / "out"), dtype=torch.float32, runtime="dense")  # stored numbers
                ppl = perplexity(loaded, ids, 2048, a.windows, progress=False)["perplexity"]
            entry = row.setdefault(kind, {})
            entry.update({"compress_seconds": result["compress_seconds"], "wikitext2_ppl": ppl,
                          "bits_per_weight": result["bits_per_weight"]})
            print(kind, "compress", round(result["compress_seconds"], 1), "s, ppl", round(ppl, 3), flush=True)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for kind in ("measured", "estimated"):
        row.get(kind, {}).pop("choice", None)
    results[f"{a.target}-{a.budget}"] = row
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
