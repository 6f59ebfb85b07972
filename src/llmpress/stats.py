"""Calibration statistics of a linear layer's input, as mergeable accumulators (sum + count), so
batches, shards and devices combine by addition."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class InputStats:
    """For inputs X (n, in): gram = X^T X (in, in) [float32], abs_sum = sum |X| (in,), count = n.

    `hessian()` is the mean Gram matrix (what GPTQ / SparseGPT call H up to a factor 2),
    `col_norms()` the per-input-channel L2 norm ||X_j|| (Wanda), `abs_mean()` the mean |X_j| (AWQ, ASVD).
    """

    def __init__(self, in_features: int, gram: bool = True):
        self.gram = torch.zeros(in_features, in_features) if gram else None
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()       # (n, in)
        if self.gram is not None:
            self.gram.addmm_(x.T, x)
        self.sq_sum += x.square().sum(0, dtype=torch.float64)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    def merge(self, other: "InputStats") -> "InputStats":
        if self.gram is not None:
            self.gram += other.gram
        self.sq_sum += other.sq_sum
        self.abs_sum += other.abs_sum
        self.count += other.count
        return self

    def hessian(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)

    def col_norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()

    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


@contextmanager
def collect_inputs(modules: dict[str, nn.Module], gram: dict[str, bool]):
    """Within the `with`, every forward of modules[name] adds its input to the yielded stats[name].
    Hooks are removed on exit, also when the body raises."""
    stats = {name: InputStats(m.in_features, gram[name]) for name, m in modules.items()}
    handles = [m.register_forward_hook(lambda mod, args, out, s=stats[name]: s.add(args[0]))
               for name, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
