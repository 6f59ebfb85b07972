"""Block-wise tuning of what a quantized block stores besides its integer codes: the per-group scales
of its QuantLinear layers and its RMSNorm weights, by gradient descent on the block's output error.

After GPTQ has fixed every code, each block still has a few free numbers per row: the fp16 scales
(out, G) and the norm weights (C,). They are fitted to make the block's outputs on the compressed
model's inputs match a target (the uncompressed block's outputs: on the same inputs, or with a
reference stream, on the uncompressed model's inputs). Learnable quantization parameters trained on
the block's output error: OmniQuant (Shao et al. 2023, "OmniQuant: Omnidirectionally Calibrated
Quantization for Large Language Models", arXiv:2308.13137, learnable weight clipping); tuning the
norms of a quantized block: Norm Tweaking (Li et al. 2023, "Norm Tweaking: High-performance Low-bit
Quantization of Large Language Models", arXiv:2309.02784). Codes, zero points and the storage format
do not change, so neither does any export path or the cost model.
"""
from __future__ import annotations

import torch
from torch import nn

from llmpress.modules import QuantLinear


def _batches(n: int, size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[k:k + size] for k in range(0, n, size)]


def tune_block(block: nn.Module, walk, inputs: torch.Tensor, targets: torch.Tensor, epochs: int,
               lr: float = 2e-3, seed: int = 0) -> dict:
    """Fit the scales of every QuantLinear in `block` and its RMSNorm weights so that block(inputs)
    approaches `targets` (both (N, T, C) on the walk's storage device) in mean squared error.

    Every tuned tensor t is t0 * exp(u), u (same shape) learned by Adam (so lr is a relative change
    per step, signs never flip, a zero scale stays zero), for `epochs` passes over the N windows in
    batches of walk.batch_size in a seeded order. The error over all windows is measured before and
    after (with the scales as stored, fp16); when tuning did not lower it, everything is put back
    and the returned info says so. Returns {"mse_before", "mse_after", "ratio", "kept", "steps",
    "tensors"}."""
    quant = [m for m in block.modules() if isinstance(m, QuantLinear)]
    norms = {name + ".weight": m.weight for name, m in block.named_modules()
             if name.endswith("norm") and isinstance(getattr(m, "weight", None), nn.Parameter)}
    # fixed per layer: (q - zero) (out, in) float32, the group of each column, the solved scales
    fixed = []
    for m in quant:
        g = torch.arange(m.in_features, device=m.scale.device) // m.group_size
        fixed.append((m.int_weight().float() - m.zeros()[:, g], g, m.scale.float()))
    norm0 = {k: w.detach().float().clone() for k, w in norms.items()}
    u_scale = [torch.zeros_like(s0, requires_grad=True) for _, _, s0 in fixed]
    u_norm = {k: torch.zeros_like(w0, requires_grad=True) for k, w0 in norm0.items()}
    flags = {p: p.requires_grad for p in block.parameters()}

    def mse() -> float:
        # a batch at a time (walk.run batches too, but would hold all N outputs at once)
        with torch.no_grad():
            total = sum((walk.run(block, inputs[k:k + walk.batch_size]).float()
                         - targets[k:k + walk.batch_size].float()).square().sum().item()
                        for k in range(0, inputs.shape[0], walk.batch_size))
        return total / targets.numel()

    def store(use_u: bool) -> None:
        """Scales (fp16, as stored) and norm weights from u (or the originals) into the block."""
        with torch.no_grad():
            for m, (_, _, s0), u in zip(quant, fixed, u_scale):
                m.scale = (s0 * u.exp() if use_u else s0).to(m.scale.dtype)
                m._weight_cache = m._packed = None
            for k, w in norms.items():
                w.data = (norm0[k] * u_norm[k].exp() if use_u else norm0[k]).to(w.dtype)

    before = mse()
    opt = torch.optim.Adam(u_scale + list(u_norm.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    for p in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for idx in _batches(inputs.shape[0], walk.batch_size, gen):
                    for m, (qz, g, s0), u in zip(quant, fixed, u_scale):
                        m._weight_cache = qz * (s0 * u.exp())[:, g]          # (out, in) in the graph
                    weights = {k: (norm0[k] * u_norm[k].exp()).to(w.dtype) for k, w in norms.items()}
                    out = torch.func.functional_call(block, weights, (inputs[idx].to(walk.device),), walk.kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    loss = (out.float() - targets[idx].to(walk.device).float()).square().mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    steps += 1
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        store(True)
    after = mse()
    if not after < before:
        store(False)
    return {"mse_before": before, "mse_after": after, "ratio": round(after / before, 6) if before > 0 else 1.0,
            "kept": after < before, "steps": steps, "tensors": len(quant) + len(norms)}
