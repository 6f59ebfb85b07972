"""Issue 26: Basis Sharing (Wang et al., ICLR 2025) against SVD-LLM on the embedded SmolLM2-135M at
the same share of the block linears' parameters kept (0.8 / 0.7 / 0.6 = 20 / 30 / 40 % compression):

- `svd-llm`: every block linear factorized on its own (llmpress's pipeline, propagated);
- `share N`: q/k/v/gate/up with one basis per projection type shared by runs of N consecutive blocks,
  o/down private (llmpress.sharing.share_basis);
- `share search N`: the runs of 1..N blocks per projection type chosen by least calibration output error
  (llmpress.sharing.search_partition).
All rows: the same calibration windows (`wikipedia`, --samples x 512, seed 0; never the evaluation text);
WikiText-2 perplexity over the first --windows 2048-token windows; bytes of the block linears as stored
(a shared basis once); compress seconds.

    .venv/bin/python bench/basis_sharing.py [--ratios 0.8,0.7,0.6] [--samples 64] [--windows 20]
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

from llmpress import SVDLLM, Plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import model_size, perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402
from llmpress.sharing import search_partition, share_basis  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.8,0.7,0.6")
    ap.add_argument("--groups", default="2,4")
    ap.add_argument("--search", type=int, default=2, help="largest run for the searched rows (0: none)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench/results/basis_sharing.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    dense, tok = load_model("smollm2-135m")
    ids = eval_tokens(tok, "wikitext2")
    calib = calibration_tokens(tok, "wikipedia", a.samples, 512, 0)
    names = adapter_for(dense).linear_names(dense)
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else {}
    if "dense" not in rows:
        rows["dense"] = {"wikitext2_ppl": perplexity(dense, ids, 2048, a.windows, progress=False)["perplexity"],
                         "bytes": model_size(dense)["bytes"]}
    for ratio in (float(r) for r in a.ratios.split(",")):
        runs = [("svd-llm", None, None)] + [(f"share {g}", g, False) for g in map(int, a.groups.split(","))]
        if a.search:
            runs.append((f"share search {a.search}", a.search, True))
        for name, group, search in runs:
            label = f"{name} @ {ratio}"
            if label in rows:
                continue
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            row = {}
            if group is None:
                compress(model, Plan.uniform(SVDLLM(param_ratio=ratio)).resolve(names), calib, progress=False)
            else:
                partition = None
                if search:
                    partition, row["search"] = search_partition(model, calib, ratio, group, progress=False)
                    row["shared_groups"] = {k.split(".")[-1]: sum(len(r) > 1 for r in v) for k, v in partition.items()}
                share_basis(model, calib, group, ratio, partition, progress=False)
            row["compress_seconds"] = time.perf_counter() - t
            size = model_size(model)
            row.update(bytes=size["bytes"], params_kept=size["bytes"] / 2 / size["params"],
                       wikitext2_ppl=perplexity(model, ids, 2048, a.windows, progress=False)["perplexity"])
            rows[label] = row
            print(label, json.dumps(row), flush=True)
            out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{'row':28s} {'kept':>6s} {'ppl':>9s} {'s':>7s}")
    for label, r in rows.items():
        print(f"{label:28s} {r.get('params_kept', 1):6.3f} {r['wikitext2_ppl']:9.2f} {r.get('compress_seconds', 0):7.1f}")


if __name__ == "__main__":
    main()
