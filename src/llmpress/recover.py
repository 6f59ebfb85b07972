"""Recovery after quantization: fine-tune the low-rank adapters of a compressed model end to end,
its quantized (or sparse) bases frozen, and the saliency a per-weight penalty can use.

`train_adapters` is the fine-tuning step of QLoRA / LoftQ / ApiQ (Liao et al. 2024, "ApiQ:
Finetuning of 2-Bit Quantized Large Language Model", arXiv:2402.05147: the adapters it initialized
block by block are then trained on the task with the quantized weights frozen; its WikiText-2 recipe:
AdamW, lr 3e-4, weight decay 0.1, 3 % linear warm-up, cosine decay). Here the task is next-token
prediction on the calibration text, with a held-out share of its windows measuring whether the
training helped (never the evaluation text).

`fisher_diagonal` is the saliency of Cao & Aref 2025 ("Enhancing Ultra-Low-Bit Quantization of
Large Language Models Through Saliency-Aware Partial Retraining", arXiv:2504.13932): the diagonal
empirical Fisher F_ij = sum_n (dL_n / dW_ij)^2 of the uncompressed model, one window per sample
(as SqueezeLLM's gradient tool, which their code reads).
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.errors import LLMPressError
from llmpress.modules import CompressedLinear, _PlusLowRank


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T) ids (transformers shifts the labels)."""
    return model(input_ids=ids, labels=ids).loss


def fisher_diagonal(model: nn.Module, tokens: torch.Tensor, names: list[str], batch_size: int = 1,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """{fqn: F (out, in) float32 on the CPU}: the sum over the N calibration windows of each one's
    squared gradient of its mean next-token loss with respect to the weight of linear `fqn` (one
    backward per window; batch_size is ignored so that every square is a single sample's).
    The model is left as it was (no gradients kept)."""
    if tokens is None or tokens.numel() == 0:
        raise LLMPressError("the saliency (Fisher) needs calibration tokens")
    params = {n: model.get_submodule(n).weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    out = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for k in tqdm(range(tokens.shape[0]), desc="saliency (Fisher)", disable=not progress):
                loss = _lm_loss(model, tokens[k:k + 1].to(device))
                grads = torch.autograd.grad(loss, list(params.values()))
                for n, g in zip(params, grads):
                    out[n] += g.detach().float().square().cpu()
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return out


def _adapters(model: nn.Module) -> list[tuple[str, _PlusLowRank]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _PlusLowRank)]


def train_adapters(model: nn.Module, tokens: torch.Tensor, steps: int, lr: float = 3e-4, batch_size: int = 4,
                   holdout: float = 0.125, weight_decay: float = 0.1, warmup: float = 0.03, seed: int = 0,
                   progress: bool = True) -> dict:
    """Train the up/down factors of every adapter layer (gptq-lr, apiq, OATS: quantized or sparse
    base + low-rank) for `steps` AdamW steps of next-token loss on batches of `batch_size` windows
    drawn (seeded) from the first 1 - holdout of the (N, T) calibration windows; every other weight
    stays as it is. The mean loss on the held-out windows is measured before and after: when training
    did not lower it, the factors are put back. Returns {"steps", "train_windows", "heldout_windows",
    "heldout_loss_before", "heldout_loss_after", "kept", "layers", "seconds"}."""
    layers = _adapters(model)
    if not layers:
        raise LLMPressError("recovery trains low-rank adapters: this model has no adapter layers "
                            "(use a method with one: apiq, gptq-lr)")
    if not isinstance(steps, int) or steps < 1:
        raise LLMPressError(f"recovery steps must be a positive integer, got {steps!r}")
    if not 0 < holdout < 1:
        raise LLMPressError(f"holdout must be in (0, 1), got {holdout!r}")
    n_held = max(1, round(tokens.shape[0] * holdout))
    if tokens.shape[0] - n_held < 1:
        raise LLMPressError(f"recovery needs at least 2 calibration windows (one held out), got {tokens.shape[0]}")
    train, held = tokens[:-n_held], tokens[-n_held:]
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()                                   # no dropout: the quantized model's own forward

    def heldout_loss() -> float:
        with torch.no_grad():
            return sum(_lm_loss(model, held[k:k + batch_size].to(device)).item() * held[k:k + batch_size].shape[0]
                       for k in range(0, held.shape[0], batch_size)) / held.shape[0]

    stored = {(n, p): getattr(m, p).clone() for n, m in layers for p in ("up", "down")}
    compressed = [m for m in model.modules() if isinstance(m, CompressedLinear) and not isinstance(m, _PlusLowRank)]
    flags = {p: p.requires_grad for p in model.parameters()}
    before = heldout_loss()
    factors = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():          # the frozen bases run from dense copies (autograd through the input)
            for m in compressed:
                m._weight_cache = m.dense_weight().to(device)
        for _, m in layers:
            for p in ("up", "down"):
                t = getattr(m, p).float().requires_grad_(True)
                setattr(m, p, t)                    # a buffer: assignment replaces it
                factors.append(t)
        opt = torch.optim.AdamW(factors, lr=lr, weight_decay=weight_decay)
        n_warm = max(1, round(warmup * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / n_warm if s < n_warm else 0.5 * (1 + math.cos(math.pi * (s - n_warm) / max(1, steps - n_warm))))
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in tqdm(range(steps), desc="recover (adapters)", disable=not progress):
                idx = torch.randint(train.shape[0], (min(batch_size, train.shape[0]),), generator=gen)
                loss = _lm_loss(model, train[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        for m in compressed:
            m._weight_cache = None
        for n, m in layers:
            for p in ("up", "down"):
                setattr(m, p, getattr(m, p).detach().to(stored[(n, p)].dtype))
            m._weight_cache = None
        for p, f in flags.items():
            p.requires_grad_(f)
    after = heldout_loss()
    kept = after < before
    if not kept:
        for n, m in layers:
            for p in ("up", "down"):
                setattr(m, p, stored[(n, p)])
    model.train(was_training)
    return {"steps": steps, "train_windows": int(train.shape[0]), "heldout_windows": int(held.shape[0]),
            "heldout_loss_before": before, "heldout_loss_after": after, "kept": kept, "layers": len(layers),
            "lr": lr, "batch_size": batch_size, "seconds": time.perf_counter() - t0}
