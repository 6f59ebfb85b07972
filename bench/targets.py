"""Issue 25: each target's default recipe for a budget, against the old default menu, on the embedded
SmolLM2-135M, through the CLI exactly as a user runs it (`llmpress compress --target T --budget B`).

Rows (--rows, comma-separated labels of ROWS): the same calibration windows for all (`wikipedia`,
--samples x 512, seed 0; never the evaluation text). Per row: WikiText-2 test perplexity of the
llmpress folder (2048-token windows, the first --windows), the size of what the target runs (the
GGUF file, the compressed-tensors folder's safetensors, or the llmpress folder's), the block
linears' bits per weight, the wall time of the whole compress (sensitivity table included).
Results accumulate in bench/results/targets.json (rows already there are skipped).

    .venv/bin/python bench/targets.py [--rows gguf-4bit,vllm-4bit,old-bits4] [--samples 64] [--windows 20]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

ROWS = {
    "gguf-4bit": ["--recipe", "gguf-4bit"],                                    # llama.cpp, bits=4.5
    "vllm-4bit": ["--recipe", "vllm-4bit"],                                    # vllm, bits=4.5
    "transformers-4bit": ["--target", "transformers", "--budget", "bits=4.5"],
    "old-bits4.5": ["--budget", "bits=4.5", "--menu", "gptq,sparsegpt,svd-llm"],  # the default before targets
    "llmpress-3bit": ["--recipe", "llmpress-3bit"],
    "old-bits3": ["--budget", "bits=3", "--menu", "gptq,sparsegpt,svd-llm"],
    "transformers-3bit": ["--target", "transformers", "--budget", "bits=3"],
}


def _size(folder: Path, recipe: dict) -> int:
    target = recipe.get("target", "llmpress")
    if target == "llama.cpp":
        return (folder / "model.gguf").stat().st_size
    where = folder / "compressed-tensors" if target in ("vllm", "transformers") else folder
    return sum(f.stat().st_size for f in where.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="gguf-4bit,vllm-4bit,transformers-4bit,old-bits4.5")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench/results/targets.json"))
    a = ap.parse_args()
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else {}
    cache = Path(tempfile.mkdtemp(prefix="llmpress-bench-cache-"))     # every table measured in this run
    for label in a.rows.split(","):
        if label in rows:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / label
            cmd = [PY, "-m", "llmpress", "compress", "--model", "smollm2-135m", *ROWS[label], "--calib", "wikipedia",
                   "--num-samples", str(a.samples), "--seq-len", "512", "--out", str(folder),
                   "--sensitivity", str(cache / f"{label}.json"), "--json", str(Path(tmp) / "c.json")]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "LLMPRESS_CACHE": str(cache)})
            seconds = time.perf_counter() - t
            result = json.loads((Path(tmp) / "c.json").read_text())
            manifest = json.loads((folder / "llmpress.json").read_text())
            subprocess.run([PY, "-m", "llmpress", "eval", "--model", str(folder), "--max-windows", str(a.windows),
                            "--json", str(Path(tmp) / "e.json")], check=True)
            ev = json.loads((Path(tmp) / "e.json").read_text())
            rows[label] = {"command": " ".join(["llmpress", "compress", *ROWS[label]]),
                           "recipe": manifest["recipe"], "wall_seconds": seconds,
                           "compress_seconds": result["compress_seconds"],
                           "bits_per_weight": result["bits_per_weight"], "runs_bytes": _size(folder, manifest["recipe"]),
                           "wikitext2_ppl": ev["perplexity"], "methods": result["allocation"]["methods"]}
        out.write_text(json.dumps(rows, indent=2) + "\n")
        r = rows[label]
        print(f"{label:20s} ppl {r['wikitext2_ppl']:8.3f}  {r['bits_per_weight']:.3f} b/w  "
              f"{r['runs_bytes'] / 1e6:7.1f} MB  {r['wall_seconds']:7.0f} s", flush=True)


if __name__ == "__main__":
    main()
