"""Issue 5 diagnostic: how reliable are the in-context KLs the `refine` allocator measures?

Runs one refine round at params 0.5 from the knapsack choice (4 held-out calibration windows of 512
tokens, never evaluation text) and records every measured KL per window. Then, without building
any model:
  - split-half reliability: the change in KL that moving a layer one level causes, measured on
    windows {0, 1} against windows {2, 3} (correlation over all layer moves);
  - agreement of those changes with the sensitivity table's estimates;
  - cross-validation: the knapsack over {current, neighbours} solved on one half (errors = table
    estimate blended with the measured change, weight w) and scored by the other half's measured
    changes (summed, i.e. to first order), for w in 0 .. 1.
With --build W, the plan solved on all four windows at blend weight W is built with the sequential
pipeline and its WikiText-2 perplexity measured (seq_len 2048, first 20 windows).

    .venv/bin/python bench/refine_noise.py [--build 0.5]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress.allocate import knapsack_among, refine, summarize, to_plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.budget import Budget, Table  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "refine_noise.json"


def solve(table: Table, budget: Budget, start: dict, deltas: dict, w: float) -> dict:
    """Knapsack over {current, measured neighbours}; error = (1 - w) * table estimate change +
    w * measured change (both relative to the current option)."""
    errors = {}
    for n, moves in deltas.items():
        opts = table.layers[n]["options"]
        cur = opts[start[n]]["error"]
        errors[n] = {start[n]: 0.0, **{int(i): (1 - w) * (opts[int(i)]["error"] - cur) + w * d for i, d in moves.items()}}
    return knapsack_among(table, budget, errors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default=str(ROOT / "bench" / ".cache" / "sensitivity-v3-gptq-sparsegpt-svdllm.json"))
    ap.add_argument("--build", type=float, help="blend weight of the plan to build and evaluate")
    ap.add_argument("--one-pass", action="store_true",
                    help="build with one-pass statistics (as refine assembles its candidates), and the "
                         "knapsack start the same way, to compare the two on WikiText-2")
    a = ap.parse_args()
    dense, tok = load_model("smollm2-135m")
    tokens = calibration_tokens(tok, "wikipedia", 64, 512, seed=0)
    held_out = calibration_tokens(tok, "wikipedia", 68, 512, seed=0)[-4:]
    table = Table.load(a.table).restricted(["sparsegpt", "svd-llm"])
    budget = Budget.parse("params=0.5")
    if RESULTS.is_file():
        data = json.loads(RESULTS.read_text())
    else:
        record: list = []
        t = time.perf_counter()
        refine(table, budget, model=dense, stats_tokens=tokens, eval_tokens=held_out, rounds=1, record=record)
        data = {"date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - t, "round": record[0]}
        RESULTS.write_text(json.dumps(data))
    start = {n: int(i) for n, i in data["round"]["start"].items()}
    kl = data["round"]["kl_per_window"]
    # per layer and neighbour: the change in per-window KL against the current option, (W,)
    moves = {n: {i: np.array(v) - np.array(per[str(start[n])]) for i, v in per.items() if int(i) != start[n]}
             for n, per in kl.items()}
    flat = [(n, i, d) for n, m in moves.items() for i, d in m.items()]
    da = np.array([d[:2].mean() for _, _, d in flat])
    db = np.array([d[2:].mean() for _, _, d in flat])
    est = np.array([table.layers[n]["options"][int(i)]["error"] - table.layers[n]["options"][start[n]]["error"]
                    for n, i, _ in flat])
    full = (da + db) / 2
    print(f"{len(flat)} layer moves measured in {data['seconds']:.0f}s")
    print(f"split-half correlation of the measured KL changes: {np.corrcoef(da, db)[0, 1]:.3f}")
    print(f"correlation of the measured changes (4 windows) with the table's estimates: {np.corrcoef(full, est)[0, 1]:.3f}")
    print(f"median |measured| / |estimate|: {np.median(np.abs(full) / np.maximum(np.abs(est), 1e-12)):.2f}")
    cv = {}
    for w in (0.0, 0.25, 0.5, 0.75, 1.0):
        scores = []
        for fit, score in ((slice(0, 2), slice(2, 4)), (slice(2, 4), slice(0, 2))):
            fitted = {n: {i: d[fit].mean() for i, d in m.items()} for n, m in moves.items()}
            ch = solve(table, budget, start, fitted, w)
            scores.append(sum(moves[n][str(i)][score].mean() for n, i in ch.items() if i != start[n]))
        cv[w] = float(np.mean(scores))
        print(f"blend w={w:.2f}: held-out half's first-order KL change {cv[w]:+.4f} nats/token")
    data["analysis"] = {"moves": len(flat), "split_half_corr": float(np.corrcoef(da, db)[0, 1]),
                        "corr_with_estimate": float(np.corrcoef(full, est)[0, 1]), "cross_validated": cv}
    if a.build is not None:
        all_w = {n: {i: d.mean() for i, d in m.items()} for n, m in moves.items()}
        choice = solve(table, budget, start, all_w, a.build)
        names = adapter_for(dense).linear_names(dense)
        mode = "one-pass" if a.one_pass else "sequential"
        for label, ch in ([("start", start)] if a.one_pass else []) + [(f"w={a.build}", choice)]:
            model = copy.deepcopy(dense)
            compress(model, to_plan(table, ch).resolve(names), tokens, progress=False, propagate=not a.one_pass)
            ppl = perplexity(model, eval_tokens(tok, "wikitext2"), 2048, 20, progress=False)["perplexity"]
            info = summarize(table, ch, budget)
            print(f"{label} ({mode}): {sum(ch[n] != start[n] for n in names)} layers moved, "
                  f"params kept {info['params_kept']:.4f}, WikiText-2 perplexity {ppl:.3f}")
            data.setdefault("built", {})[f"{label} {mode}"] = {"perplexity": ppl, **info}
    RESULTS.write_text(json.dumps(data))


if __name__ == "__main__":
    main()
