"""Issue 26: PARSE (prompt-aware rank selection, `parse`) against static SVD-LLM on the embedded
SmolLM2-135M (float32), every block linear compressed, same calibration windows (`wikipedia`,
64 x 512, seed 0; the routers are fitted on those windows' compressed-model activations, a quarter
held out).

Per running ratio R (--ratios): `svd-llm` at R (the same rank per token as PARSE: same compute),
`parse` at R (stores more components: its bytes are reported), and `svd-llm` at the ratio whose
stored bytes match PARSE's (same memory). Measured: WikiText-2 perplexity (2048-token windows,
the first --windows; PARSE routes each window on its first 32 tokens, which run the static
components), the block linears' stored bytes, and prefill (256 tokens) / decode (32 steps) tokens/s
at batch 1 in llmpress's runtime (factors as two matmuls; PARSE gathers its prompt's components once
and reuses them while decoding), against the dense model in the same process.

    .venv/bin/python bench/parse.py [--ratios 0.6,0.8] [--windows 20] [--out bench/results/parse.json]
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

from llmpress import Plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import model_size, perplexity, speed  # noqa: E402
from llmpress.methods.lowrank import SVDLLM  # noqa: E402
from llmpress.methods.parse import PARSE, fit_routers  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.6,0.8")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench/results/parse.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    dense, tok = load_model("smollm2-135m", dtype=torch.float32)
    names = adapter_for(dense).linear_names(dense)
    calib = calibration_tokens(tok, "wikipedia", 64, 512, 0)
    ids = eval_tokens(tok, "wikitext2")

    def measure(model, label, extra=None):
        t = time.perf_counter()
        ppl = perplexity(model, ids, 2048, a.windows, progress=False)["perplexity"]
        s = speed(model, batch_sizes=(1,))
        row = {"wikitext2_ppl": ppl, "block_linear_bytes": model_size(model)["bytes"],
               "prefill_tokens_per_s": s["prefill_tokens_per_s"], "decode_tokens_per_s": s["decode_tokens_per_s"],
               "eval_seconds": time.perf_counter() - t, **(extra or {})}
        print(label, json.dumps(row), flush=True)
        return row

    rows = {"dense": measure(dense, "dense")}

    def run(config):
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        compress(model, Plan.uniform(config).resolve(names), calib, progress=False)
        extra = {"config": config.to_dict(), "compress_seconds": time.perf_counter() - t}
        if config.method == "parse":
            t = time.perf_counter()
            report = fit_routers(model, calib)
            extra.update(router_seconds=time.perf_counter() - t, routers_kept=sum(r["kept"] for r in report.values()),
                         routers=len(report),
                         heldout_share_static=sum(r["heldout_share_static"] for r in report.values()) / len(report),
                         heldout_share_routed=sum(r["heldout_share_routed"] for r in report.values()) / len(report))
        return model, extra

    for ratio in (float(r) for r in a.ratios.split(",")):
        model, extra = run(SVDLLM(param_ratio=ratio))
        rows[f"svd-llm {ratio}"] = measure(model, f"svd-llm {ratio}", extra)
        del model
        model, extra = run(PARSE(param_ratio=ratio))
        rows[f"parse {ratio}"] = measure(model, f"parse {ratio}", extra)
        del model
        # SVD-LLM at ratio q stores fp16 factors of about q * out * in values: 2q bytes per weight, against
        # the float32 dense linears' 4: the ratio storing PARSE's bytes is 2 x its share of the dense bytes
        match = round(min(0.95, 2 * rows[f"parse {ratio}"]["block_linear_bytes"] / rows["dense"]["block_linear_bytes"]), 3)
        model, extra = run(SVDLLM(param_ratio=match))
        rows[f"svd-llm {match} (parse {ratio}'s bytes)"] = measure(model, f"svd-llm {match}", extra)
        del model
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": "smollm2-135m float32",
                                       "eval": f"wikitext2 2048 x {a.windows}", "rows": rows}, indent=1) + "\n")
    d = rows["dense"]
    print(f"{'row':<36} {'ppl':>9} {'bytes':>12} {'prefill':>8} {'decode':>8}")
    for label, r in rows.items():
        print(f"{label:<36} {r['wikitext2_ppl']:>9.3f} {r['block_linear_bytes']:>12,} "
              f"{r['prefill_tokens_per_s'] / d['prefill_tokens_per_s']:>7.2f}x {r['decode_tokens_per_s'] / d['decode_tokens_per_s']:>7.2f}x")


if __name__ == "__main__":
    main()
