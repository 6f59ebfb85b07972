"""Is sparse + low-rank (W ~ S + L) better than sparse alone at the same parameter count, per layer?

On the embedded model (calibration 64 x 512 from `wikipedia`, seed 0), for every linear of the given
blocks: the relative output error tr(dW H dW^T) / tr(W H W^T) of SparseGPT at 50 % against
S = SparseGPT at a higher sparsity plus L = the whitened (SVD-LLM) best rank-r fit of W - S, with
the low-rank part taking a share f of the same parameter budget, alternated 3 times
(L from W - S, then S = SparseGPT(W - L)), as in OATS (Zhang et al. 2024, arXiv:2409.13652).

    .venv/bin/python bench/sparse_lowrank_layers.py --blocks 1,10,20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens  # noqa: E402
from llmpress.methods.lowrank import whitened_factors, whitened_svd  # noqa: E402
from llmpress.methods.sparsegpt import sparsegpt_solve  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.walk import BlockWalk  # noqa: E402


def output_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    return torch.einsum("oi,ij,oj->", dw.double(), h, dw.double()).item()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="1,10,20")
    ap.add_argument("--shares", default="0.05,0.1,0.2", help="low-rank share of the parameter budget")
    a = ap.parse_args()
    want = {int(b) for b in a.blocks.split(",")}
    shares = [float(f) for f in a.shares.split(",")]
    model, tok = load_model("smollm2-135m")
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    walk = BlockWalk(model, progress=False)
    hidden = walk.capture(calibration_tokens(tok, "wikipedia", 64, 512, seed=0))
    print("block layer sparsegpt-50% " + " ".join(f"f={f}:iter{k}" for f in shares for k in range(3)))
    for i, block in enumerate(blocks[:max(want) + 1]):
        out, stats = walk.collect(block, hidden, walk.all_heads())
        if i in want:
            for group in adapter.input_groups:
                for name in group:
                    w = block.get_submodule(name).weight.detach().float()
                    h = stats[name].hessian().double()
                    base, n, (o, k) = output_error(w, h), w.numel(), w.shape
                    row = [output_error(w - sparsegpt_solve(w, h.float(), 0.5, None)[0], h) / base]
                    for f in shares:
                        rank = int(f * 0.5 * n / (o + k))
                        sparsity = 1 - (0.5 * n - rank * (o + k)) / n        # same parameters as 50 %
                        s = sparsegpt_solve(w, h.float(), sparsity, None)[0]
                        for _ in range(3):
                            up, down = whitened_factors(*whitened_svd(w - s, h)[:4], rank)
                            row.append(output_error(w - s - up @ down, h) / base)
                            s = sparsegpt_solve(w - up @ down, h.float(), sparsity, None)[0]
                    print(i, name, " ".join(f"{e:.4g}" for e in row), flush=True)
        hidden = out


if __name__ == "__main__":
    main()
