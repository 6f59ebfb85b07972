"""Evaluation: perplexity with the papers' protocol, and size as stored."""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.arch import adapter_for
from llmpress.errors import LLMPressError
from llmpress.modules import linear_bytes, linear_params


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> dict:
    """ids: (n_tokens,) the whole evaluation text tokenized once. Non-overlapping windows of seq_len
    from token 0, the short tail dropped; perplexity = exp(mean of the per-window mean losses)."""
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise LLMPressError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    t0 = time.perf_counter()
    losses = []
    for i in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not progress):
        window = ids[i * seq_len:(i + 1) * seq_len][None]          # (1, T)
        losses.append(model(window, labels=window, use_cache=False).loss.float().item())
    mean = sum(losses) / len(losses)
    return {"perplexity": math.exp(mean), "mean_loss": mean, "seq_len": seq_len, "windows": n_windows,
            "total_windows": ids.numel() // seq_len, "eval_seconds": time.perf_counter() - t0}


def model_size(model: nn.Module) -> dict:
    """Size of the decoder blocks' linear layers (the compressible part) as stored.
    `bits_per_weight` = 8 * bytes / parameters of the dense layers they stand for."""
    adapter = adapter_for(model)
    modules = [model.get_submodule(n) for n in adapter.linear_names(model)]
    nbytes = sum(linear_bytes(m) for m in modules)
    params = sum(linear_params(m) for m in modules)
    return {"params": params, "bytes": nbytes, "bits_per_weight": 8 * nbytes / params,
            "total_params": sum(p.numel() for p in model.parameters())}
