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
        raise LLMPressError(f"the share of experts to remove (prune or merge) must be in (0, 1), got {ratio!r}")
    n = adapter.moe.num_experts(model.config)
    keep = n - round(ratio * n)
    top_k = int(model.config.num_experts_per_tok)
    if keep < max(top_k, 1) or keep == n:
        raise LLMPressError(f"removing {ratio:.0%} of {n} experts keeps {keep}: it must leave at least the "
                            f"{top_k} the router picks per token and remove at least one")
    return keep


def _keep_router_rows(router: nn.Module, rows: list[int]) -> None:
    """Cut a router to the experts `rows` (in that order): its weight (and bias, score correction)
    rows and its expert count, so its softmax and top-k run over them only."""
    router.weight = nn.Parameter(router.weight.data[rows].clone(), requires_grad=False)
    if getattr(router, "bias", None) is not None:
        router.bias = nn.Parameter(router.bias.data[rows].clone(), requires_grad=False)
    for attr in ("num_experts", "n_routed_experts"):
        if hasattr(router, attr):
            setattr(router, attr, len(rows))
    if hasattr(router, "e_score_correction_bias"):
        router.e_score_correction_bias = router.e_score_correction_bias[rows]


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
        _keep_router_rows(getattr(moe, layout.router), kept)
    setattr(model.config, layout.experts_key, len(keep[0]))
    return {"experts_before": n, "experts_after": len(keep[0]), "kept": keep}


# ---------------------------------------------------------------------------------------------
# Expert merging: MC-SMoE (Li et al., ICLR 2024, "Merge, Then Compress: Demystify Efficient SMoE
# with Hints from Its Routing Policy", arXiv:2310.01334). Per layer: the most frequently routed
# experts are the groups' dominant experts; every other expert joins the dominant whose router
# logits over the calibration tokens are most similar (cosine); each group becomes one expert, its
# members' neurons first aligned to the dominant's (weight matching: a permutation of the
# intermediate neurons, Hungarian on the concatenated gate / up / down weights), then averaged
# weighted by routing frequency. The router keeps the dominants' rows, so the result is a standard
# config with fewer experts (every layer keeps the same count), which "then compress" compresses.


def merge_stats(model: nn.Module, tokens: torch.Tensor, device="cpu", batch_size: int = 8,
                progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """Per decoder block: {"tokens": (E,) routed token counts, "logit_gram": (E, E) float64 sum over
    the calibration tokens of the router logits' outer products} (one forward of the model)."""
    from llmpress.walk import BlockWalk
    adapter = _moe_adapter(model)
    layout = adapter.moe
    walk = BlockWalk(model, device, batch_size, progress)
    hidden = walk.capture(tokens)
    out = []
    for _, block in walk.steps("merge statistics", keep=False):
        moe = block.get_submodule(layout.moe_path)
        router = getattr(moe, layout.router)
        gram = torch.zeros(router.weight.shape[0], router.weight.shape[0], dtype=torch.float64)

        def pre(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            z = (x.float() @ router.weight.float().T).double()               # (S, E) router logits
            gram.add_((z.T @ z).cpu())
        handle = moe.register_forward_pre_hook(pre)
        try:
            with recording(block) as records:
                hidden = walk.run(block, hidden)
        finally:
            handle.remove()
        out.append({"tokens": records[0]["tokens"].clone(), "logit_gram": gram})
    return out


def merge_groups(stats: list[dict[str, torch.Tensor]], keep: int) -> list[list[list[int]]]:
    """Per layer: `keep` groups, each [dominant, members...]: the `keep` most routed experts
    (ties: lower index) lead; every other expert joins the dominant of most similar router logits."""
    out = []
    for record in stats:
        freq, gram = record["tokens"], record["logit_gram"]
        n = freq.numel()
        if not 0 < keep < n:
            raise LLMPressError(f"cannot merge {n} experts into {keep}")
        order = sorted(range(n), key=lambda e: (-freq[e].item(), e))
        dominant = sorted(order[:keep])
        norm = gram.diagonal().clamp(min=1e-30).sqrt()
        cos = gram / (norm[:, None] * norm[None, :])                          # (E, E)
        groups = {d: [d] for d in dominant}
        for e in sorted(order[keep:]):
            groups[max(dominant, key=lambda d: (cos[e, d].item(), -d))].append(e)
        out.append([groups[d] for d in dominant])
    return out


def _neurons(expert) -> torch.Tensor:
    """(I, 3H): intermediate neuron i's gate row, up row and down column, side by side."""
    return torch.cat([expert.gate_proj.weight.float(), expert.up_proj.weight.float(),
                      expert.down_proj.weight.float().T], 1)


def align(dominant, member) -> torch.Tensor:
    """The permutation p of `member`'s intermediate neurons (I,) that best matches `dominant`'s
    (neuron i of the dominant <-> neuron p[i] of the member, max sum of inner products)."""
    from scipy.optimize import linear_sum_assignment
    sim = (_neurons(dominant) @ _neurons(member).T).double().cpu().numpy()   # (I, I)
    rows, cols = linear_sum_assignment(-sim)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


@torch.no_grad()
def merge_experts(model: nn.Module, groups: list[list[list[int]]], stats: list[dict[str, torch.Tensor]]) -> dict:
    """Replace, in block i, each group of groups[i] by one expert (see above); in place, before any
    compression. Returns what was done (for the manifest)."""
    from llmpress.arch.moe import ExpertMLP
    adapter = _moe_adapter(model)
    layout, blocks = adapter.moe, adapter.blocks(model)
    n = layout.num_experts(model.config)
    if len(groups) != len(blocks) or len({len(g) for g in groups}) != 1:
        raise LLMPressError("give every block the same number of expert groups")
    for i, layer in enumerate(groups):
        members = sorted(e for g in layer for e in g)
        if members != list(range(n)):
            raise LLMPressError(f"block {i}: the groups {layer} must hold every expert 0..{n - 1} once")
    if len(groups[0]) < int(model.config.num_experts_per_tok):
        raise LLMPressError(f"merging into {len(groups[0])} experts leaves fewer than the "
                            f"{model.config.num_experts_per_tok} the router picks per token")
    for block, layer, record in zip(blocks, groups, stats):
        moe = block.get_submodule(layout.moe_path)
        experts = moe.experts
        if any(hasattr(experts[e].gate_proj, "dense_weight") for e in range(len(experts))):
            raise LLMPressError("merge experts before compressing them")
        if any(getattr(experts[e], k).bias is not None for e in range(len(experts))
               for k in ("gate_proj", "up_proj", "down_proj")):
            raise LLMPressError("merging experts with biases is not supported (prune them instead)")
        merged = []
        for group in layer:
            d = experts[group[0]]
            w = record["tokens"][group].double()
            w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(group))
            parts = {"gate_proj": 0, "up_proj": 0, "down_proj": 0}
            for share, e in zip(w.tolist(), group):
                p = torch.arange(d.gate_proj.out_features) if e == group[0] else align(d, experts[e])
                m = experts[e]
                parts["gate_proj"] = parts["gate_proj"] + share * m.gate_proj.weight.double()[p]
                parts["up_proj"] = parts["up_proj"] + share * m.up_proj.weight.double()[p]
                parts["down_proj"] = parts["down_proj"] + share * m.down_proj.weight.double()[:, p]
            linears = {}
            for name, weight in parts.items():
                old = getattr(d, name)
                lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=old.weight.device,
                                dtype=old.weight.dtype)
                lin.weight = nn.Parameter(weight.to(old.weight.dtype), requires_grad=False)
                linears[name] = lin
            merged.append(ExpertMLP(linears["gate_proj"], linears["up_proj"], linears["down_proj"], d.act_fn))
        moe.experts = RoutedExperts(merged)
        _keep_router_rows(getattr(moe, layout.router), [g[0] for g in layer])
    setattr(model.config, layout.experts_key, len(groups[0]))
    return {"method": "mc-smoe", "experts_before": n, "experts_after": len(groups[0]), "groups": groups}
