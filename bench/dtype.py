"""Issue 11: the embedded model compressed in bfloat16 vs float32 (GPTQ W4 g128, calibration
64 x 512 `wikipedia` seed 0; WikiText-2 perplexity, seq_len 2048, first 20 windows), each evaluated
in its own dtype, plus the bf16-compressed model evaluated in float32. Same process, same tokens.

    .venv/bin/python bench/dtype.py [--out bench/results/dtype.json] [--windows 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress import GPTQ, Plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import model_size, perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dtype.json"))
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="rows to (re)measure; others are kept from --out")
    a = ap.parse_args()
    out = Path(a.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else {}
    for dtype in (getattr(torch, d) for d in a.dtypes.split(",")):
        name = str(dtype).removeprefix("torch.")
        model, tok = load_model("smollm2-135m", dtype=dtype)
        tokens = calibration_tokens(tok, "wikipedia", 64, 512, seed=0)
        ids = eval_tokens(tok, "wikitext2")
        t = time.perf_counter()
        dense_ppl = perplexity(model, ids, 2048, a.windows, progress=False)["perplexity"]
        dense_eval_s = time.perf_counter() - t
        rep = compress(model, Plan.uniform(GPTQ(bits=4, group_size=128)).resolve(adapter_for(model).linear_names(model)),
                       tokens, progress=False)
        t = time.perf_counter()
        ppl = perplexity(model, ids, 2048, a.windows, progress=False)["perplexity"]
        rows[name] = {"dense_perplexity": dense_ppl, "gptq_perplexity": ppl, "compress_seconds": rep.seconds,
                      "dense_eval_seconds": dense_eval_s, "gptq_eval_seconds": time.perf_counter() - t,
                      "bits_per_weight": model_size(model)["bits_per_weight"]}
        print(name, json.dumps(rows[name]), flush=True)
        if dtype == torch.bfloat16:   # the same compressed weights, run in float32 (nn.Module.float:
            torch.nn.Module.float(model)   # transformers refuses .float() on a GGUF-loaded model)
            rows[name]["gptq_perplexity_run_in_float32"] = perplexity(model, ids, 2048, a.windows, progress=False)["perplexity"]
        print(name, json.dumps(rows[name]), flush=True)
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "windows": a.windows, "rows": rows}, indent=1) + "\n")
        del model
    f32, b16 = rows["float32"]["gptq_perplexity"], rows["bfloat16"]["gptq_perplexity"]
    rows["ratio_bf16_to_fp32"] = b16 / f32
    print(f"GPTQ W4 g128 perplexity: float32 {f32:.3f}, bfloat16 {b16:.3f} ({100 * (b16 / f32 - 1):+.2f} %)")
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "windows": a.windows,
                                       "torch_threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
