"""The prepared GPU check (issue 25): run it the first minutes a GPU machine is lent.

Builds Llama-3.2-1B-shaped and Llama-3-8B-shaped models (4 blocks each) with random weights from a
config (nothing is downloaded) and reports, for GPTQ W4 g128 on --samples x --seq-len random tokens in
bf16: seconds per block and in total, peak GPU memory, the two-forward floor on the same blocks (two
forward passes of the calibration tokens through the dense blocks: what a propagated walk cannot go
below) and the ratio (target <= 1.5x); then CPU-vs-GPU equality on a tiny model (the same codes from
both devices, the share of equal weights). `--tiny` runs every step on CPU-sized shapes, so the script
stays working without a GPU (tests/test_gpu_script.py).

    python bench/gpu.py                 # on the GPU machine: both shapes, 128 x 2048 tokens (< 8 minutes)
    python bench/gpu.py --tiny          # anywhere, seconds
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
from llmpress.pipeline import compress  # noqa: E402

SHAPES = {   # hidden, intermediate, heads, kv heads
    "llama-3.2-1b": (2048, 8192, 32, 8),
    "llama-3-8b": (4096, 14336, 32, 8),
    "tiny": (128, 256, 4, 2),
}


def build(shape: str, layers: int, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    h, i, heads, kv = SHAPES[shape]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    return LlamaForCausalLM(config).to(dtype).eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def floor_seconds(model, tokens, device, batch_size=8) -> float:
    """Two forward passes of `tokens` through the dense model's blocks on `device`."""
    model.to(device)
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(2):
            for b in range(0, tokens.shape[0], batch_size):
                model.model(tokens[b:b + batch_size].to(device))
    _sync(device)
    seconds = time.perf_counter() - t
    model.to("cpu")
    return seconds


def gptq_run(shape, layers, samples, seq_len, device, dtype) -> dict:
    model = build(shape, layers, dtype)
    tokens = torch.randint(0, 1024, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    floor = floor_seconds(model, tokens, device)
    configs = Plan.uniform(GPTQ(bits=4, group_size=128)).resolve(adapter_for(model).linear_names(model))
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    report = compress(model, configs, tokens, device=device, progress=False)
    peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None
    return {"shape": shape, "blocks": layers, "tokens": [samples, seq_len], "seconds": report.seconds,
            "seconds_per_block": report.seconds / layers, "floor_seconds": floor,
            "vs_floor": report.seconds / floor, "peak_gpu_bytes": peak}


def equality(device) -> dict:
    """The tiny model compressed on the CPU and on `device` (float32): equal codes and weights?"""
    out = {}
    tokens = torch.randint(0, 1024, (8, 64), generator=torch.Generator().manual_seed(1))
    for where in ("cpu", device):
        model = build("tiny", 2, torch.float32)
        configs = Plan.uniform(GPTQ(bits=4, group_size=128)).resolve(adapter_for(model).linear_names(model))
        compress(model, configs, tokens, device=where, progress=False)
        out[where] = {n: model.get_submodule(n).dense_weight().cpu() for n in configs}
    a, b = out["cpu"], out[device]
    equal = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
    return {"device": str(device), "share_of_equal_weights": equal,
            "max_abs_difference": max(float((a[n] - b[n]).abs().max()) for n in a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shapes and tokens (checks the script itself)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    dtype = torch.bfloat16
    shapes = ["tiny"] if a.tiny else ["llama-3.2-1b", "llama-3-8b"]
    samples, seq_len = (8, 64) if a.tiny else (a.samples, a.seq_len)
    rows = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "runs": []}
    for shape in shapes:
        r = gptq_run(shape, 2 if a.tiny else a.blocks, samples, seq_len, device, dtype)
        rows["runs"].append(r)
        peak = f"{r['peak_gpu_bytes'] / 2**30:.1f} GiB" if r["peak_gpu_bytes"] else "-"
        print(f"{shape:14s} {r['seconds_per_block']:7.2f} s/block  total {r['seconds']:7.1f} s  floor "
              f"{r['floor_seconds']:6.1f} s  {r['vs_floor']:.2f}x  peak {peak}", flush=True)
    rows["equality"] = equality(device)
    print(f"CPU vs {device}: {100 * rows['equality']['share_of_equal_weights']:.2f} % of weights equal, "
          f"max |diff| {rows['equality']['max_abs_difference']:.3g}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
