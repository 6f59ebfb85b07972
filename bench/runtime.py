"""Issue 25: a compressed model is never slower than dense in its default dtype. Decode and prefill
speed of the embedded SmolLM2-135M compressed to 4-bit (RTN, group 32: the format decides the
speed, not the solver) and to 3-bit (no kernel), under each runtime (llmpress.modules.RUNTIMES),
against the dense model in the same dtype, measured in the same process by `llmpress eval --speed
--kl-base` (ratios, not absolute tokens/s, are the result: any other job on the CPU slows both).

    .venv/bin/python bench/runtime.py [--rows fp32-w4-fast,...] [--out bench/results/runtime.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FORMATS = {"w4": ["--method", "rtn", "--bits", "4", "--group-size", "32"],
           "w3": ["--method", "rtn", "--bits", "3", "--group-size", "32"]}
ROWS = [f"{dtype}-{fmt}-{runtime}" for dtype in ("float32", "bfloat16") for fmt in FORMATS
        for runtime in ("fast", "rebuild", "dense")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default=str(ROOT / "bench/results/runtime.json"))
    a = ap.parse_args()
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for label in a.rows.split(","):
            dtype, fmt, runtime = label.split("-")
            if (dtype, fmt) not in folders:
                folders[dtype, fmt] = Path(tmp) / f"{dtype}-{fmt}"
                subprocess.run([PY, "-m", "llmpress", "compress", "--model", "smollm2-135m", *FORMATS[fmt],
                                "--dtype", dtype, "--out", str(folders[dtype, fmt])], check=True,
                               stdout=subprocess.DEVNULL)
            js = Path(tmp) / f"{label}.json"
            t = time.perf_counter()
            subprocess.run([PY, "-m", "llmpress", "eval", "--model", str(folders[dtype, fmt]), "--speed",
                            "--kl-base", "smollm2-135m", "--kl-windows", "1", "--seq-len", "512", "--dtype", dtype,
                            "--base-dtype", dtype, "--runtime", runtime, "--json", str(js)], check=True,
                           stdout=subprocess.DEVNULL)
            r = json.loads(js.read_text())
            row = {"decode_speedup": r["decode_speedup"], "decode_tokens_per_s": r["decode_tokens_per_s"],
                   "base_decode_tokens_per_s": r["base"]["decode_tokens_per_s"],
                   "prefill_speedup": r["prefill_tokens_per_s"] / r["base"]["prefill_tokens_per_s"],
                   "weight_memory_ratio": r["weight_memory_ratio"], "kl": r["kl"],
                   "bits_per_weight": r["bits_per_weight"], "seconds": time.perf_counter() - t,
                   "torch_threads": r["torch_threads"]}
            results["rows"][label] = row
            results["date"] = time.strftime("%Y-%m-%d")
            out.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{label:24s} decode {row['decode_speedup']:.2f}x dense ({row['decode_tokens_per_s']:.1f} vs "
                  f"{row['base_decode_tokens_per_s']:.1f} tok/s), prefill {row['prefill_speedup']:.2f}x, "
                  f"weights in memory {row['weight_memory_ratio']:.2f}x, KL {row['kl']:.5f}", flush=True)


if __name__ == "__main__":
    main()
