"""Issue 26: the data-free series expansion (`series`: K low-bit terms, each quantizing the residual
of the ones before, FP=xINT's tensor-level expansion) against round to nearest with and without a
searched clipping range (`rtn`, `rtn clip=mse`: the data-free rounding baselines) at matched bits,
on the embedded SmolLM2-135M (symmetric grids, group 128: not the asymmetric 4-bit g32 grid its
weights went through). No calibration data anywhere.

Measured: WikiText-2 perplexity (2048-token windows, first 20), bits per weight of the block
linears as stored, compress seconds.

    .venv/bin/python bench/series.py [--out bench/results/series.json]
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

from llmpress import RTN, Plan, Series  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import eval_tokens  # noqa: E402
from llmpress.eval import model_size, perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402

CONFIGS = {
    "rtn 2-bit": RTN(bits=2), "rtn 2-bit clip=mse": RTN(bits=2, clip="mse"),
    "rtn 3-bit": RTN(bits=3), "rtn 3-bit clip=mse": RTN(bits=3, clip="mse"),
    "rtn 4-bit": RTN(bits=4), "rtn 4-bit clip=mse": RTN(bits=4, clip="mse"),
    "series 2-bit x 2": Series(bits=2, terms=2), "series 2-bit x 2 clip=mse": Series(bits=2, terms=2, clip="mse"),
    "series 3-bit x 2": Series(bits=3, terms=2), "series 2-bit x 3": Series(bits=2, terms=3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench/results/series.json"))
    ap.add_argument("--only", help="comma-separated row names")
    a = ap.parse_args()
    torch.set_num_threads(2)
    dense, tok = load_model("smollm2-135m")
    ids = eval_tokens(tok, "wikitext2")
    names = adapter_for(dense).linear_names(dense)
    rows = {"dense": {"wikitext2_ppl": perplexity(dense, ids, 2048, 20, progress=False)["perplexity"], "bits": 32.0}}
    print("dense", rows["dense"], flush=True)
    for label, config in CONFIGS.items():
        if a.only and label not in a.only.split(","):
            continue
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        compress(model, Plan.uniform(config).resolve(names), None, progress=False)
        seconds = time.perf_counter() - t
        rows[label] = {"config": config.to_dict(), "seconds": seconds, "bits": model_size(model)["bits_per_weight"],
                       "wikitext2_ppl": perplexity(model, ids, 2048, 20, progress=False)["perplexity"]}
        print(label, json.dumps(rows[label]), flush=True)
        del model
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": "smollm2-135m",
                                       "eval": "wikitext2 2048 x 20", "rows": rows}, indent=1) + "\n")
    print(f"{'config':<30} {'bits':>6} {'ppl':>10} {'s':>6}")
    for label, r in rows.items():
        print(f"{label:<30} {r['bits']:>6.3f} {r['wikitext2_ppl']:>10.3f} {r.get('seconds', 0):>6.1f}")


if __name__ == "__main__":
    main()
