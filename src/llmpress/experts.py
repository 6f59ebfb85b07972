"""Expert pruning for mixtures of experts: score every routed expert on calibration tokens, drop
the lowest-scoring ones in every layer, re-point the router at the experts that remain.

Criteria (per layer, per expert e, over the tokens x the router sends to e):
- `reap`: the mean of g_e(x) * ||f_e(x)||_2, the router weight times the norm of the expert's
  output: how much the expert actually adds to the block's output (Lasby et al. 2025, "REAP the
  Experts: Why Pruning Prevails for One-Shot MoE Compression", arXiv:2510.13999);
- `frequency`: how many tokens are routed to e (the usual baseline).

Every layer keeps the same number of experts, so the result is a standard config with a smaller
expert count (transformers, vLLM and llama.cpp run it without custom code). The router keeps its
rows for the kept experts: its softmax (and top-k) now runs over them only, as in REAP.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from llmpress.arch.moe import RoutedExperts
from llmpress.errors import LLMPressError

CRITERIA = ("reap", "frequency")


def _moe_adapter(model: nn.Module):
    """The model's adapter, refused unless it is a mixture of experts."""
    from llmpress.arch import adapter_for
    adapter = adapter_for(model)
    if adapter.moe is None:
        raise LLMPressError("expert pruning applies to mixtures of experts; this model has none")
    return adapter


@contextmanager
def recording(block: nn.Module):
    """Within the `with`: every RoutedExperts of `block` accumulates, per expert, the routed token
    count, the sum of router weights and the sum of router weight x output norm. Yields the list
    of the records ({"tokens", "gate", "reap"}: float64 tensors (E,)), one per MoE module."""
    modules = [m for m in block.modules() if isinstance(m, RoutedExperts)]
    records = []
    for m in modules:
        m.record = {k: torch.zeros(len(m), dtype=torch.float64) for k in ("tokens", "gate", "reap")}
        records.append(m.record)
    try:
        yield records
    finally:
        for m in modules:
            m.record = None


def expert_scores(model: nn.Module, tokens: torch.Tensor, device="cpu", batch_size: int = 8,
                  progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """Per decoder block, {"tokens", "gate", "reap"} (E,) float64 sums over the calibration tokens
    (N, T), measured in one forward of the unmodified model, block by block."""
    from llmpress.walk import BlockWalk
    _moe_adapter(model)
    walk = BlockWalk(model, device, batch_size, progress)
    hidden = walk.capture(tokens)
    out = []
    for _, block in walk.steps("expert scores", keep=False):
        with recording(block) as records:
            hidden = walk.run(block, hidden)
        out.append({k: v.clone() for k, v in records[0].items()})
    return out


def score(record: dict[str, torch.Tensor], criterion: str) -> torch.Tensor:
    """(E,) scores of one layer's record: REAP's mean of g * ||f|| over routed tokens, or the count."""
    if criterion == "frequency":
        return record["tokens"].clone()
    if criterion == "reap":
        return record["reap"] / record["tokens"].clamp(min=1)     # an expert never routed to scores 0
    raise LLMPressError(f"unknown expert criterion {criterion!r}; use {' or '.join(CRITERIA)}")


def choose_experts(scores: list[dict[str, torch.Tensor]], keep: int, criterion: str = "reap") -> list[list[int]]:
    """The `keep` highest-scoring experts of every layer, in their original order (ties: lower index)."""
    out = []
    for record in scores:
        s = score(record, criterion)
        if not 0 < keep <= s.numel():
            raise LLMPressError(f"cannot keep {keep} of {s.numel()} experts")
        order = sorted(range(s.numel()), key=lambda e: (-s[e].item(), e))
        out.append(sorted(order[:keep]))
    return out


def experts_to_keep(model: nn.Module, ratio: float) -> int:
    """Experts per layer left after pruning a share `ratio` of them; refused when that leaves fewer
    than the router picks per token."""
    adapter = _moe_adapter(model)
    if not 0 < ratio < 1:
        raise LLMPressError(f"the share of experts to prune must be in (0, 1), got {ratio!r}")
    n = adapter.moe.num_experts(model.config)
    keep = n - round(ratio * n)
    top_k = int(model.config.num_experts_per_tok)
    if keep < max(top_k, 1) or keep == n:
        raise LLMPressError(f"pruning {ratio:.0%} of {n} experts keeps {keep}: it must leave at least the "
                            f"{top_k} the router picks per token and remove at least one")
    return keep


@torch.no_grad()
def prune_experts(model: nn.Module, keep: list[list[int]]) -> dict:
    """Keep, in block i, only the experts keep[i] (same count in every block): their modules stay,
    the router's rows are cut to them, the config's expert count is updated. In place; returns
    what was done (for the manifest)."""
    adapter = _moe_adapter(model)
    layout, blocks = adapter.moe, adapter.blocks(model)
    if len(keep) != len(blocks) or len({len(k) for k in keep}) != 1:
        raise LLMPressError("give every block the same number of experts to keep")
    n = layout.num_experts(model.config)
    for i, (block, kept) in enumerate(zip(blocks, keep)):
        if sorted(set(kept)) != sorted(kept) or not all(0 <= e < n for e in kept):
            raise LLMPressError(f"block {i}: experts to keep {kept} are not distinct indices below {n}")
    if len(keep[0]) < int(model.config.num_experts_per_tok):
        raise LLMPressError(f"keeping {len(keep[0])} experts leaves fewer than the {model.config.num_experts_per_tok} "
                            "the router picks per token")
    for block, kept in zip(blocks, keep):
        moe = block.get_submodule(layout.moe_path)
        experts = moe.experts
        if any(hasattr(experts[e].gate_proj, "dense_weight") for e in range(len(experts))):
            raise LLMPressError("prune experts before compressing them")
        moe.experts = RoutedExperts([experts[e] for e in kept])
        router = getattr(moe, layout.router)
        router.weight = nn.Parameter(router.weight.data[kept].clone(), requires_grad=False)
        for attr in ("num_experts", "n_routed_experts"):
            if hasattr(router, attr):
                setattr(router, attr, len(kept))
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias = router.e_score_correction_bias[kept]
    setattr(model.config, layout.experts_key, len(keep[0]))
    return {"experts_before": n, "experts_after": len(keep[0]), "kept": keep}
