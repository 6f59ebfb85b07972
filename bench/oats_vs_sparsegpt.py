"""Sparse + low-rank (the `oats` method) against SparseGPT at equal stored parameters, per layer, on
the embedded SmolLM2-135M and on a larger model (Qwen2.5-Coder-0.5B, whose matrices are bigger:
896 x 4864): is sparse + low-rank better where matrices are larger?

For every linear of the chosen blocks (calibration 64 x 512 `wikipedia`, seed 0; the blocks' inputs
come from the dense model): relative output error tr(dW H dW^T) / tr(W H W^T) of SparseGPT at 50 %
and of oats at param_ratio 0.5 (its default rank share), with their stored bytes (equal by
construction: a sparse part with fp16 values + 1-bit mask, fp16 factors). Also the share of the
whitened weight's energy in its top 5 % singular values (how far from full rank the layer is).

    .venv/bin/python bench/oats_vs_sparsegpt.py --gguf /path/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
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

from llmpress.arch import adapter_for  # noqa: E402
from llmpress.config import handler_for, parse_method_spec  # noqa: E402
from llmpress.data import calibration_tokens  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.walk import BlockWalk  # noqa: E402

METHODS = {"sparsegpt": "sparsegpt:sparsity=0.5", "oats": "oats:param_ratio=0.5"}


def rel_error(w: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> float:
    d = (w2 - w).double()
    return (torch.einsum("oi,ij,oj->", d, h, d) / torch.einsum("oi,ij,oj->", w.double(), h, w.double())).item()


def top_energy(w: torch.Tensor, h: torch.Tensor, share: float = 0.05) -> float:
    """Share of ||W L||_F^2 (L L^T = H) in the top `share` of its singular values."""
    evals, evecs = torch.linalg.eigh(h.double())
    root = evecs * evals.clamp(min=0).sqrt()                     # H = root root^T
    s = torch.linalg.svdvals(w.double() @ root)
    k = max(1, int(share * s.numel()))
    return (s[:k].square().sum() / s.square().sum()).item()


@torch.no_grad()
def measure(model_spec: str, blocks: list[int], tokens_n: int) -> dict:
    model, tok = load_model(model_spec)
    adapter = adapter_for(model)
    walk = BlockWalk(model, progress=False)
    hidden = walk.capture(calibration_tokens(tok, "wikipedia", tokens_n, 512, seed=0))
    configs = {k: parse_method_spec(v) for k, v in METHODS.items()}
    rows = []
    for i, block in enumerate(adapter.blocks(model)[:max(blocks) + 1]):
        out, stats = walk.collect(block, hidden, walk.all_heads())
        if i in blocks:
            for group in adapter.input_groups:
                for local in group:
                    linear = block.get_submodule(local)
                    w, h = linear.weight.detach().float(), stats[local].hessian().double()
                    row = {"block": i, "layer": local, "shape": list(w.shape), "top5pct_energy": top_energy(w, h)}
                    for name, config in configs.items():
                        t = time.perf_counter()
                        module, _ = handler_for(config)(linear, config, stats[local])
                        row[name] = rel_error(w, module.dense_weight(), h)
                        row[name + "_bytes"] = module.stored_bytes()
                        row[name + "_seconds"] = time.perf_counter() - t
                    rows.append(row)
                    print(f"{model_spec[-30:]:30s} {i:3d} {local:18s} sparsegpt {row['sparsegpt']:.4f}  oats {row['oats']:.4f}"
                          f"  top5% {row['top5pct_energy']:.3f}", flush=True)
        hidden = out
    wins = sum(r["oats"] < r["sparsegpt"] for r in rows)
    ratio = sum(r["oats"] / r["sparsegpt"] for r in rows) / len(rows)
    return {"rows": rows, "oats_better_layers": wins, "layers": len(rows), "mean_error_ratio_oats_over_sparsegpt": ratio}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True, help="the larger model's GGUF file")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "oats_vs_sparsegpt.json"))
    a = ap.parse_args()
    results = {"smollm2-135m": measure("smollm2-135m", [1, 15, 28], a.num_samples),
               "qwen2.5-coder-0.5b": measure(a.gguf, [1, 12, 22], a.num_samples)}
    for k, v in results.items():
        print(f"{k}: oats better on {v['oats_better_layers']} of {v['layers']} layers; "
              f"mean error ratio oats / sparsegpt {v['mean_error_ratio_oats_over_sparsegpt']:.3f}")
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
