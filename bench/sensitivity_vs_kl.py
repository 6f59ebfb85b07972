"""How good is the sensitivity table's estimate, layer by layer? For every linear and the sparsity
levels next to the one the params=0.5 knapsack picks, compress that one layer alone and measure the
exact end-to-end KL(dense || model) per token on calibration windows; compare with the table's
`error` (per-token Fisher form), `error_diag` (diagonal Fisher) and `block_error` (plain relative).
With --build: rescale each layer's estimates by its measured KL / estimate, allocate again, build
and report WikiText-2 perplexity (2048 x 20 windows).

    .venv/bin/python bench/sensitivity_vs_kl.py [--windows 2] [--build]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress.allocate import knapsack, summarize, to_plan, uniform  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.budget import Budget, Table  # noqa: E402
from llmpress.config import config_from_dict, handler_for  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402
from llmpress.walk import BlockWalk  # noqa: E402


@torch.no_grad()
def single_layer_kl(model, tokens, table: Table, choice: dict[str, int], windows: int) -> dict[str, dict[int, float]]:
    walk = BlockWalk(model, progress=False)
    adapter, blocks = walk.adapter, walk.blocks
    hidden = walk.capture(tokens)

    def tail(h, start):                          # blocks[start:] + norm + head -> log-probs (S, T, V)
        return torch.log_softmax(walk.head_logits(walk.forward_from(h, start)), -1)

    ref = tail(hidden[:windows], 0)
    out: dict[str, dict[int, float]] = {}
    bar = tqdm(total=len(table.layers), desc="single-layer KL", unit="layer")
    for i, block in enumerate(blocks):
        y_all, stats = walk.collect(block, hidden, walk.all_heads())
        for group in adapter.input_groups:
            for local in group:
                name = f"{adapter.blocks_path}.{i}.{local}"
                options = table.layers[name]["options"]
                c = max(choice[name], 1)
                linear = block.get_submodule(local)
                parent, _, attr = local.rpartition(".")
                out[name] = {}
                for j in (c - 1, c, c + 1):
                    if not 1 <= j < len(options):
                        continue
                    config = config_from_dict(options[j]["config"])
                    setattr(block.get_submodule(parent), attr, handler_for(config)(linear, config, stats[local])[0])
                    try:
                        y = walk.run(block, hidden[:windows])
                    finally:
                        setattr(block.get_submodule(parent), attr, linear)
                    logq = tail(y, i + 1)
                    out[name][j] = (ref.exp() * (ref - logq)).sum(-1)[:, :-1].mean().item()
                bar.update()
        hidden = y_all
    bar.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default=str(ROOT / "bench" / ".cache" / "sensitivity-v3-gptq-sparsegpt-svdllm.json"))
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sensitivity_vs_kl.json"))
    a = ap.parse_args()
    table = Table.load(a.table).restricted(["sparsegpt"])
    budget = Budget.parse("params=0.5")
    choice = knapsack(table, budget)
    model, tok = load_model("smollm2-135m")
    tokens = calibration_tokens(tok, "wikipedia", 64, 512, seed=0)
    t0 = time.perf_counter()
    kl = single_layer_kl(model, tokens, table, choice, a.windows)
    result = {"date": time.strftime("%Y-%m-%d"), "windows": a.windows, "seconds": time.perf_counter() - t0}
    measured = np.array([v for d in kl.values() for v in d.values()])
    for field in ("error", "error_diag", "block_error"):
        est = np.array([table.layers[n]["options"][j][field] for n, d in kl.items() for j in d])
        ok = (est > 0) & (measured > 0)
        r = np.log(measured[ok]) - np.log(est[ok])
        result[field] = {"log_corr": float(np.corrcoef(np.log(est[ok]), np.log(measured[ok]))[0, 1]),
                         "log_ratio_sd": float(r.std()), "median_kl_over_estimate": float(np.exp(np.median(r)))}
        print(f"{field:<12} pairs {ok.sum()}  log-corr {result[field]['log_corr']:.3f}  sd of log(KL/estimate) "
              f"{r.std():.3f}  median KL/estimate {np.exp(np.median(r)):.3f}", flush=True)
    if a.build:
        layers = {}
        for name, layer in table.layers.items():
            f = float(np.exp(np.mean([np.log(v / layer["options"][j]["error"]) for j, v in kl[name].items()])))
            layers[name] = {**layer, "options": [{**o, "error": o["error"] * f} for o in layer["options"]]}
        corrected = Table(layers, {**table.meta, "corrected_by": "single-layer KL"})
        choice = knapsack(corrected, budget)
        ref = uniform(corrected, next(o["label"] for o in table.layers[next(iter(table.layers))]["options"]
                                      if o["config"] and o["config"]["sparsity"] == 0.5))
        names = adapter_for(model).linear_names(model)
        compress(model, to_plan(corrected, choice).resolve(names), tokens, progress=False)
        ppl = perplexity(model, eval_tokens(tok, "wikitext2"), 2048, 20, progress=False)["perplexity"]
        result["corrected_knapsack"] = {"perplexity": ppl, **summarize(corrected, choice, budget),
                                        "predicted_uniform": summarize(corrected, ref, budget)["predicted_error"]}
        print(f"knapsack on KL-corrected estimates: perplexity {ppl:.3f}", flush=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
