"""Block-wise fitting of what a quantized block stores besides its integer codes, by gradient descent
on the block's output error: the per-group scales of its QuantLinear layers, its RMSNorm weights,
and the low-rank adapter factors of its QuantLowRankLinear layers.

After GPTQ has fixed every code, each block still has a few free numbers per row: the fp16 scales
(out, G) and the norm weights (C,). They are fitted to make the block's outputs on the compressed
model's inputs match a target (the uncompressed block's outputs: on the same inputs, or with a
reference stream, on the uncompressed model's inputs). Learnable quantization parameters trained on
the block's output error: OmniQuant (Shao et al. 2023, "OmniQuant: Omnidirectionally Calibrated
Quantization for Large Language Models", arXiv:2308.13137, learnable weight clipping); tuning the
norms of a quantized block: Norm Tweaking (Li et al. 2023, "Norm Tweaking: High-performance Low-bit
Quantization of Large Language Models", arXiv:2309.02784). Codes, zero points and the storage format
do not change, so neither does any export path or the cost model.

With factors=True the adapters (up (out, r), down (r, in)) are fitted with the scales: ApiQ's
block-wise initialization (Liao et al. 2024, "ApiQ: Finetuning of 2-Bit Quantized Large Language
Model", arXiv:2402.05147, ApiQ-bw), which makes the quantized block plus its adapters reproduce the
uncompressed block's outputs before any fine-tuning. An optional saliency term adds
lambda * sum_layers sum_ij F_ij (W'_ij - W_ij)^2 / sum_ij F_ij W_ij^2, F the diagonal empirical Fisher
of the uncompressed model (llmpress.recover.fisher_diagonal) and W' the quantized weight (the scales
move): the saliency-aware partial retraining of Cao & Aref 2025 ("Enhancing Ultra-Low-Bit
Quantization of Large Language Models Through Saliency-Aware Partial Retraining", arXiv:2504.13932;
their code's default `before_lora` term), made relative so lambda is dimensionless.
"""
from __future__ import annotations

import torch
from torch import nn

from llmpress.modules import QuantLinear, QuantLowRankLinear


def _batches(n: int, size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[k:k + size] for k in range(0, n, size)]


def tune_block(block: nn.Module, walk, inputs: torch.Tensor, targets, epochs: int,
               lr: float = 2e-3, seed: int = 0, *, norms: bool = True, factors: bool = False,
               factor_lr: float = 5e-4, saliency: dict | None = None, saliency_weight: float = 0.0) -> dict:
    """Fit the scales of every QuantLinear in `block` (and its RMSNorm weights when `norms`, the
    up/down factors of its QuantLowRankLinear layers when `factors`) so that block(inputs) approaches
    `targets`: one (N, T, C) tensor or a list of them (the loss is the sum of their mean squared
    errors; ApiQ fits both the uncompressed model's outputs and the uncompressed block's outputs on
    the compressed inputs), on the walk's storage device.

    Every scale and norm t is t0 * exp(u), u (same shape) learned by Adam (so lr is a relative change
    per step, signs never flip, a zero scale stays zero); factors are learned as they are (Adam, lr
    factor_lr). `epochs` passes over the N windows in batches of walk.batch_size in a seeded order.
    saliency: {local name of a QuantLinear or QuantLowRankLinear: (F (out, in), W (out, in))} with
    saliency_weight > 0 adds the saliency term of the module docstring. The output error over all
    windows is measured before and after (with everything as stored, fp16); when fitting did not
    lower it, everything is put back and the returned info says so. Returns {"mse_before",
    "mse_after", "ratio", "kept", "steps", "tensors"}."""
    targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    names = {m: name for name, m in block.named_modules()}
    quant = [m for m in block.modules() if isinstance(m, QuantLinear)]
    adapters = [m for m in block.modules() if isinstance(m, QuantLowRankLinear)] if factors else []
    norm_w = {name + ".weight": m.weight for name, m in block.named_modules()
              if norms and name.endswith("norm") and isinstance(getattr(m, "weight", None), nn.Parameter)}
    # fixed per layer: (q - zero) (out, in) float32, the group of each column, the solved scales
    fixed = []
    for m in quant:
        g = torch.arange(m.in_features, device=m.scale.device) // m.group_size
        fixed.append((m.int_weight().float() - m.zeros()[:, g], g, m.scale.float()))
    norm0 = {k: w.detach().float().clone() for k, w in norm_w.items()}
    u_scale = [torch.zeros_like(s0, requires_grad=True) for _, _, s0 in fixed]
    u_norm = {k: torch.zeros_like(w0, requires_grad=True) for k, w0 in norm0.items()}
    fac0 = {f"{names[m]}.{p}": getattr(m, p).detach().float().clone() for m in adapters for p in ("up", "down")}
    fac = {k: v.clone().requires_grad_(True) for k, v in fac0.items()}
    # the saliency term's layers: (index into quant, F, W, sum F W^2)
    owner = {id(m.quant): names[m] for m in block.modules() if isinstance(m, QuantLowRankLinear)}
    reg = []
    if saliency and saliency_weight > 0:
        for k, m in enumerate(quant):
            key = owner.get(id(m), names[m])
            if key in saliency:
                f, w = (t.to(m.scale.device).float() for t in saliency[key])
                reg.append((k, f, w, (f * w.square()).sum().clamp_min(1e-30)))
    flags = {p: p.requires_grad for p in block.parameters()}

    def mse() -> float:
        # a batch at a time (walk.run batches too, but would hold all N outputs at once)
        total = 0.0
        with torch.no_grad():
            for k in range(0, inputs.shape[0], walk.batch_size):
                out = walk.run(block, inputs[k:k + walk.batch_size]).float()
                total += sum((out - t[k:k + walk.batch_size].float()).square().sum().item() for t in targets)
        return total / targets[0].numel()

    def store(use_u: bool) -> None:
        """Scales (fp16, as stored), norm weights and factors from the fit (or the originals)."""
        with torch.no_grad():
            for m, (_, _, s0), u in zip(quant, fixed, u_scale):
                m.scale = (s0 * u.exp() if use_u else s0).to(m.scale.dtype)
                m._weight_cache = m._packed = None
            for k, w in norm_w.items():
                w.data = (norm0[k] * u_norm[k].exp() if use_u else norm0[k]).to(w.dtype)
            for k, v in (fac if use_u else fac0).items():
                mod, _, p = k.rpartition(".")
                getattr(block.get_submodule(mod), p).copy_(v.detach())

    before = mse()
    groups = [{"params": u_scale + list(u_norm.values()), "lr": lr}]
    if fac:
        groups.append({"params": list(fac.values()), "lr": factor_lr})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    for p in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for idx in _batches(inputs.shape[0], walk.batch_size, gen):
                    weights = []
                    for m, (qz, g, s0), u in zip(quant, fixed, u_scale):
                        weights.append(qz * (s0 * u.exp())[:, g])             # (out, in) in the graph
                        m._weight_cache = weights[-1]
                    tensors = {k: (norm0[k] * u_norm[k].exp()).to(w.dtype) for k, w in norm_w.items()}
                    tensors.update(fac)
                    out = torch.func.functional_call(block, tensors, (inputs[idx].to(walk.device),), walk.kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    loss = sum((out.float() - t[idx].to(walk.device).float()).square().mean() for t in targets)
                    if reg:
                        loss = loss + saliency_weight * sum((f * (weights[k] - w).square()).sum() / norm
                                                            for k, f, w, norm in reg)
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
            "kept": after < before, "steps": steps, "tensors": len(quant) + len(norm_w) + len(fac)}
