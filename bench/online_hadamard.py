"""Run-time cost of the online Hadamard (llmpress.rotate.OnlineHadamard) against the layer it
precedes, on this CPU: SmolLM2-135M's down_proj (1536 -> 576) and o_proj (576 -> 576) shapes, one
token (decoding) and 512 tokens (prefill), float32 and the packed 4-bit runtime (QuantLinear int4).

    .venv/bin/python bench/online_hadamard.py [--threads 2]

Prints the median time of the layer alone, of the rotation alone, and their ratio, measured in the
same run."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from llmpress import RTN  # noqa: E402
from llmpress.config import handler_for  # noqa: E402
from llmpress.rotate import OnlineHadamard  # noqa: E402


def median_seconds(fn, x, repeat: int = 200) -> float:
    with torch.no_grad():
        for _ in range(10):
            fn(x)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"{'layer':10s} {'tokens':>6s} {'layer us':>9s} {'int4 us':>8s} {'rotation us':>11s} {'rot/layer':>9s} {'rot/int4':>8s}")
    for name, (out_f, in_f) in {"down_proj": (576, 1536), "o_proj": (576, 576)}.items():
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        config = RTN(bits=4, group_size=32)
        q, _ = handler_for(config)(linear, config, None)
        rot = OnlineHadamard(in_f)
        for tokens in (1, 512):
            x = torch.randn(1, tokens, in_f)
            t_layer = median_seconds(linear, x)
            t_q = median_seconds(q, x)
            t_rot = median_seconds(rot, x)
            print(f"{name:10s} {tokens:6d} {t_layer * 1e6:9.1f} {t_q * 1e6:8.1f} {t_rot * 1e6:11.1f} "
                  f"{t_rot / t_layer:9.2f} {t_rot / t_q:8.2f}")


if __name__ == "__main__":
    main()
