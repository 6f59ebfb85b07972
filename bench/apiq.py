"""Issue 26: recovery after quantization on the embedded SmolLM2-135M, at 2 and 3 bits (GPTQ base,
symmetric, group 64, act-order, clip=mse, rank-16 adapters on every block linear):

- `gptq`: the base alone (no adapter; the same codes as every other row of its bit width);
- `zero-init + recover`: QLoRA's start (up = 0) and the end-to-end fine-tuning (`apiq:epochs=0`);
- `apiq`: ApiQ-bw's block-wise fit of adapters + scales, before any fine-tuning, and `+ recover`;
- `apiq saliency + recover`: the fit with Cao & Aref's saliency term (diagonal empirical Fisher of
  the dense model), then the same fine-tuning.
Every row: the same calibration windows (`wikipedia` 64 x 512, seed 0; never the evaluation text),
the same fine-tuning (--steps AdamW steps of 2 windows, lr 3e-4, cosine, 1/8 of the windows held
out). Measured: WikiText-2 perplexity (2048-token windows, first 20), zero-shot accuracy (lm-eval's
arc_easy and piqa, first --limit documents each), bits per weight as stored, seconds (compress and
fine-tune).

    .venv/bin/python bench/apiq.py [--bits 2,3] [--steps 60] [--limit 300] [--out bench/results/apiq.json]
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

from llmpress import GPTQ, ApiQ, Plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import model_size, perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402
from llmpress.recover import train_adapters  # noqa: E402
from llmpress.zeroshot import evaluate_tasks  # noqa: E402

RANK, GROUP = 16, 64


def rows_for(bits: int) -> dict:
    base = {"bits": bits, "group_size": GROUP, "rank": RANK}
    return {f"gptq {bits}-bit": (GPTQ(bits=bits, group_size=GROUP, clip="mse"), False),
            f"zero-init {bits}-bit + recover": (ApiQ(**base, epochs=0), True),
            f"apiq {bits}-bit": (ApiQ(**base, epochs=4), False),
            f"apiq {bits}-bit + recover": (ApiQ(**base, epochs=4), True),
            f"apiq saliency {bits}-bit + recover": (ApiQ(**base, epochs=4, saliency=1.0), True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--only", help="comma-separated row names")
    ap.add_argument("--out", default=str(ROOT / "bench/results/apiq.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    dense, tok = load_model("smollm2-135m")
    ids = eval_tokens(tok, "wikitext2")
    calib = calibration_tokens(tok, "wikipedia", 64, 512, 0)
    names = adapter_for(dense).linear_names(dense)

    def measure(model) -> dict:
        acc = evaluate_tasks(model, tok, ["arc_easy", "piqa"], limit=a.limit)
        return {"wikitext2_ppl": perplexity(model, ids, 2048, 20, progress=False)["perplexity"],
                "zeroshot": {k: v["acc"] for k, v in acc.items() if k != "protocol"}}

    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else {}
    if "dense" not in rows:
        rows["dense"] = {**measure(dense), "bits": 32.0}
        print("dense", rows["dense"], flush=True)
    # A row with recovery after one without, on the same config, fine-tunes a copy of that row's
    # compressed model (the compression is deterministic; this saves one compress per pair).
    done: dict[str, tuple] = {}
    for bits in (int(b) for b in a.bits.split(",")):
        for label, (config, recover) in rows_for(bits).items():
            if a.only and label not in a.only.split(","):
                continue
            key = json.dumps(config.to_dict(), sort_keys=True)
            if key in done:
                compressed, base_row = done[key]
                model = copy.deepcopy(compressed)
                row = {k: base_row[k] for k in ("config", "compress_seconds", "bits", "block_fit_mse_ratio_mean")
                       if k in base_row}
            else:
                model = copy.deepcopy(dense)
                t = time.perf_counter()
                report = compress(model, Plan.uniform(config).resolve(names), calib, progress=False)
                row = {"config": config.to_dict(), "compress_seconds": time.perf_counter() - t,
                       "bits": model_size(model)["bits_per_weight"]}
                fits = [v["block_fit"]["ratio"] for v in report.layers.values() if "block_fit" in v]
                if fits:
                    row["block_fit_mse_ratio_mean"] = sum(fits) / len(fits)
                if not recover:
                    done[key] = (copy.deepcopy(model), row)
            if recover:
                row["recovery"] = train_adapters(model, calib, a.steps, batch_size=2, progress=False)
            row.update(measure(model))
            rows[label] = row
            print(label, json.dumps(row), flush=True)
            out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{'row':40s} {'bits':>6s} {'ppl':>9s} {'arc_e':>6s} {'piqa':>6s} {'s':>7s}")
    for label, r in rows.items():
        z = r.get("zeroshot", {})
        s = r.get("compress_seconds", 0) + r.get("recovery", {}).get("seconds", 0)
        print(f"{label:40s} {r['bits']:6.2f} {r['wikitext2_ppl']:9.2f} {z.get('arc_easy', 0):6.3f} {z.get('piqa', 0):6.3f} {s:7.1f}")


if __name__ == "__main__":
    main()
