"""llmpress against llm-compressor on the embedded model, in the same run on the same machine.

    .venv/bin/python bench/compare_llmcompressor.py [--methods gptq-w4g64,...] [--peer-python PATH]

Both tools get the same dense float32 weights (saved once as a Hugging Face folder) and the same
calibration tokens (64 x 512 from `wikipedia`, seed 0). Each run is its own process. Prints per method:
compression seconds of each tool and their ratio, each against the floor (two plain forward passes
of the calibration tokens through the decoder, timed in the same run), WikiText-2 perplexity (2048 x
first 20 windows) of each, peak RSS, and whether the peer really changed the weights.
llm-compressor 0.14.0.1 is installed into bench/.peer-venv on first use.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_VENV = HERE / ".peer-venv"
CACHE = HERE / ".cache"
PEER_PINS = ["torch==2.13.0", "llmcompressor==0.14.0.1", "accelerate"]
DEFAULT = "gptq-w4g64,gptq-w3g64,sparsegpt-50,wanda-50,sparsegpt-2:4"


def ensure_peer(python: str | None) -> str:
    if python:
        return python
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        print("installing llm-compressor into bench/.peer-venv ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PINS], check=True)
    return str(py)


def prepare() -> tuple[Path, Path]:
    """Dense HF folder and calibration tokens, shared by both tools."""
    import torch  # noqa: F401
    from safetensors.torch import save_file
    sys.path.insert(0, str(ROOT / "src"))
    from llmpress.data import calibration_tokens
    from llmpress.models import load_model

    model_dir, tokens = CACHE / "smollm2-135m-dense", CACHE / "calib-wikipedia-64x512-seed0.safetensors"
    if not (model_dir / "config.json").exists() or not tokens.exists():
        model, tokenizer = load_model("smollm2-135m")
        if hasattr(model.config, "quantization_config"):   # the GGUF source's: weights are float now
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        save_file({"ids": calibration_tokens(tokenizer, "wikipedia", 64, 512, seed=0).contiguous()}, str(tokens))
    return model_dir, tokens


def run(python: str, tool: str, method: str | None, model_dir: Path, tokens: Path, windows: int) -> dict:
    cmd = [python, str(HERE / "worker.py"), "--tool", tool, "--model", str(model_dir), "--tokens", str(tokens),
           "--max-windows", str(windows)] + (["--method", method] if method else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{tool} {method} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=DEFAULT)
    ap.add_argument("--peer-python", help="python of an environment with llmcompressor==0.14.0.1")
    ap.add_argument("--no-peer", action="store_true", help="llmpress only")
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--json", default=str(HERE / "results" / "compare_llmcompressor.json"))
    a = ap.parse_args()

    peer = None if a.no_peer else ensure_peer(a.peer_python)
    model_dir, tokens = prepare()
    floor = run(sys.executable, "floor", None, model_dir, tokens, a.max_windows)["seconds"]
    print(f"floor (2 forward passes of 64 x 512 tokens through the decoder): {floor:.1f}s", flush=True)
    rows = []
    for method in a.methods.split(","):
        ours = run(sys.executable, "llmpress", method, model_dir, tokens, a.max_windows)
        theirs = run(peer, "llmcompressor", method, model_dir, tokens, a.max_windows) if peer else None
        rows.append({"method": method, "llmpress": ours, "llmcompressor": theirs})
        print(_row(method, ours, theirs, floor), flush=True)
    print("\n" + table(rows, floor))
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "floor_seconds": floor, "rows": rows}, indent=2))


def _row(method, ours, theirs, floor) -> str:
    t = f"{method:<14} llmpress {ours['seconds']:6.1f}s ({ours['seconds'] / floor:4.2f}x floor) ppl {ours['perplexity']:8.3f}"
    if theirs:
        t += (f" | llm-compressor {theirs['seconds']:6.1f}s ({theirs['seconds'] / floor:4.2f}x floor) ppl "
              f"{theirs['perplexity']:8.3f} changed {theirs['layers_changed']}/{theirs['layers']}")
    return t


def table(rows, floor) -> str:
    head = ("| method | llmpress s | llm-compressor s | time ratio | llmpress / floor | peer / floor | "
            "llmpress ppl | llm-compressor ppl | ppl ratio | peak RSS MB (ours / peer) |\n|" + "---|" * 10)
    lines = [head]
    for r in rows:
        o, p = r["llmpress"], r["llmcompressor"] or {}
        ratio = lambda k: f"{o[k] / p[k]:.3f}" if p else "-"
        lines.append(f"| {r['method']} | {o['seconds']:.1f} | {p.get('seconds', float('nan')):.1f} | {ratio('seconds')} | "
                     f"{o['seconds'] / floor:.2f} | {p.get('seconds', float('nan')) / floor:.2f} | {o['perplexity']:.3f} | "
                     f"{p.get('perplexity', float('nan')):.3f} | {ratio('perplexity')} | "
                     f"{o['peak_rss_mb']:.0f} / {p.get('peak_rss_mb', float('nan')):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
