"""Basis Sharing: Wang et al., ICLR 2025, "Basis Sharing: Cross-Layer Parameter Sharing for Large
Language Model Compression" (arXiv:2410.03765).

Consecutive decoder blocks are grouped n at a time. For one projection type p (q, k, v, gate, up) the
group's weights W_1..W_n (out, in) are stacked into W = [W_1; ...; W_n] (n*out, in) and factorized by
SVD-LLM's truncation-aware whitened SVD under the group's summed input Gram matrix G = sum_i X_i^T X_i:
W L = U S V^T (L L^T = G), so

    W_i ~= up_i @ down,   down = S_r^1/2 V_r^T L^-1 (r, in) shared,   up_i = U_r[rows of i] S_r^1/2 (out, r).

The stacked form minimizes sum_i ||(W_i - up_i down) X_i||^2 over one input-side basis only
approximately (one Gram for all, as in the paper); the basis is stored once: every block's
LowRankLinear holds the same `down` tensor (saved once, re-tied on load). The paper keeps o_proj and
down_proj out of the sharing (sharing them loses more than it saves); they get a private SVD-LLM at
the same parameter ratio, which is also what every projection gets with n = 1.

Rank: the group keeps `param_ratio` of its n*in*out weights: r*(in + n*out) <= ratio*n*in*out.
Groups are compressed in order, each on the hidden states of the groups compressed before it; the
statistics of a group's blocks come from the group's dense blocks (its later blocks on its earlier
blocks' dense outputs), as the group must be factorized at once.
"""
from __future__ import annotations

import torch
from torch import nn

from llmpress.errors import LLMPressError
from llmpress.methods.lowrank import check_ratio, whitened_factors, whitened_svd
from llmpress.modules import STORAGE_DTYPE, LowRankLinear

SHARED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
PRIVATE = ("self_attn.o_proj", "mlp.down_proj")


def shared_rank(out_f: int, in_f: int, n: int, param_ratio: float) -> int:
    """Rank of one basis shared by n layers (out_f, in_f) that keeps param_ratio of their n*out_f*in_f
    weights: the largest r with r * (in_f + n*out_f) <= ratio * n * out_f * in_f."""
    r = int(param_ratio * n * out_f * in_f // (n * out_f + in_f))
    if r < 1:
        raise LLMPressError(f"param_ratio {param_ratio} leaves rank 0 for a basis shared by {n} {out_f}x{in_f} layers")
    return min(r, n * out_f, in_f)


def share_factors(weights: list[torch.Tensor], gram: torch.Tensor, rank: int, damp: float = 0.0):
    """weights: n tensors (out_i, in); gram (in, in) the group's summed input Gram matrix ->
    ([up_i (out_i, r)], down (r, in), damping used). With n = 1 this is SVD-LLM's factorization."""
    stacked = torch.cat([w.double() for w in weights])                  # (sum out_i, in)
    u, s, vh, lower, rel = whitened_svd(stacked, gram, damp)
    up, down = whitened_factors(u, s, vh, lower, rank)                  # (sum out_i, r), (r, in)
    return list(up.split([w.shape[0] for w in weights])), down, rel


def check_share(model: nn.Module, group: int, param_ratio: float) -> None:
    """Refuse what share_basis cannot do, before any calibration text is read."""
    from llmpress.arch import adapter_for
    adapter = adapter_for(model)
    check_ratio(param_ratio)
    if adapter.moe is not None:
        raise LLMPressError("basis sharing applies to dense decoder blocks, not to a mixture of experts")
    local = {n for g in adapter.input_groups for n in g}
    missing = [n for n in (*SHARED, *PRIVATE) if n not in local]
    if missing:
        raise LLMPressError(f"{model.config.model_type}: no {', '.join(missing)} to share a basis across")
    n_blocks = len(adapter.blocks(model))
    if not 1 <= group <= n_blocks:
        raise LLMPressError(f"a basis is shared by 1 to {n_blocks} consecutive blocks, got {group}")
    if any(type(model.get_submodule(n)) is not nn.Linear for n in adapter.linear_names(model)):
        raise LLMPressError("share bases on a model whose block linears are still dense")


def uniform_partition(n_blocks: int, group: int) -> dict[str, list[list[int]]]:
    """Every shared projection type in runs of `group` consecutive blocks (the last run shorter)."""
    runs = [list(range(s, min(s + group, n_blocks))) for s in range(0, n_blocks, group)]
    return {local: runs for local in SHARED}


def _chunks(partition: dict[str, list[list[int]]], n_blocks: int) -> list[list[int]]:
    """The shortest runs of consecutive blocks that no type's group crosses: each is factorized at
    once, on the hidden states of the runs before it."""
    for local, runs in partition.items():
        if sorted(i for r in runs for i in r) != list(range(n_blocks)) or any(
                r != list(range(r[0], r[0] + len(r))) for r in runs):
            raise LLMPressError(f"{local}: groups must be runs of consecutive blocks covering 0..{n_blocks - 1} once")
    cut = set(range(1, n_blocks))
    for runs in partition.values():
        cut -= {i for r in runs for i in r[1:]}       # no cut inside any group
    edges = [0, *sorted(cut), n_blocks]
    return [list(range(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:])]


@torch.no_grad()
def share_basis(model: nn.Module, tokens: torch.Tensor, group: int = 2, param_ratio: float = 0.8,
                partition: dict[str, list[list[int]]] | None = None, device="cpu", batch_size: int = 8,
                progress: bool = True) -> dict:
    """Every block linear of `model` replaced in place by a LowRankLinear: q/k/v/gate/up with one
    basis per group of consecutive blocks and projection type, o/down with their own (SVD-LLM).
    `partition` ({shared local name: [[block, ...], ...]}, e.g. from search_partition) gives each
    type its own groups; default: runs of `group` blocks for all. Returns the manifest entry: the
    groups, and each layer's rank and relative output error sum_i ||(W_i - W'_i) X_i||^2 /
    sum_i ||W_i X_i||^2 on its calibration inputs."""
    from tqdm.auto import tqdm

    from llmpress.walk import BlockWalk
    check_share(model, group, param_ratio)
    walk = BlockWalk(model, device, batch_size, progress)
    n_blocks = len(walk)
    partition = partition or uniform_partition(n_blocks, group)
    chunks = _chunks(partition, n_blocks)
    hidden = walk.capture(tokens)
    layers: dict[str, dict] = {}
    for chunk in tqdm(chunks, desc="basis sharing", unit="group", disable=not progress):
        # statistics of each block of the chunk, through its still-dense blocks
        stats, h = {}, hidden
        for i in chunk:
            with walk.placed(i, keep=False) as block:
                h, st = walk.collect(block, h, walk.all_heads())
            stats[i] = {k: v.to("cpu") for k, v in st.items()}
        for local in SHARED:
            for members in (r for r in partition[local] if r[0] in stats):
                _factorize(walk, local, members, stats, param_ratio, layers)
        for local in PRIVATE:
            for i in chunk:
                _factorize(walk, local, [i], stats, param_ratio, layers)
        for i in chunk:                    # the next chunk reads this one's compressed outputs
            with walk.placed(i) as block:
                hidden = walk.run(block, hidden)
    return {"group": group, "param_ratio": param_ratio, "partition": {k: partition[k] for k in SHARED},
            "shared": list(SHARED), "layers": layers}


def _factorize(walk, local: str, members: list[int], stats: dict, param_ratio: float, layers: dict) -> None:
    """Blocks `members`' projection `local` -> LowRankLinear layers holding one shared `down`."""
    blocks = [walk.blocks[i] for i in members]
    olds = [b.get_submodule(local) for b in blocks]
    w = [m.weight.detach().float() for m in olds]
    grams = [stats[i][local].gram_matrix().double() for i in members]
    gram = sum(grams) / sum(stats[i][local].count for i in members)
    rank = shared_rank(*w[0].shape, len(w), param_ratio)
    ups, down, damp = share_factors(w, gram, rank)
    down = down.to(STORAGE_DTYPE).contiguous()       # one tensor, held by every member
    for i, b, m, up, wi, g in zip(members, blocks, olds, ups, w, grams):
        new = LowRankLinear(up, down, m.bias)
        _replace(b, local, new)
        entry = {"rank": rank, "damp": damp, "relative_output_error": _rel_error(wi, new, g)}
        if len(members) > 1:
            entry["shared_with"] = [walk.name(j, local) for j in members]
        layers[walk.name(i, local)] = entry


def segment_error(weights: list[torch.Tensor], hessians: list[torch.Tensor], param_ratio: float) -> float:
    """sum_i ||(W_i - W'_i) X_i||^2 / tokens of one group sharing a basis at param_ratio."""
    rank = shared_rank(*weights[0].shape, len(weights), param_ratio)
    ups, down, _ = share_factors(weights, sum(hessians), rank)
    total = 0.0
    for w, up, h in zip(weights, ups, hessians):
        d = w.double() - up.double() @ down.double()
        total += ((d @ h) * d).sum().item()
    return total


@torch.no_grad()
def search_partition(model: nn.Module, tokens: torch.Tensor, param_ratio: float = 0.8, max_group: int = 2,
                     device="cpu", batch_size: int = 8, progress: bool = True) -> tuple[dict, dict]:
    """Which blocks share, per projection type: the partition of the blocks into runs of 1 to
    `max_group` consecutive blocks that minimizes the summed calibration output error of the shared
    factorizations (dynamic programming over the chain; every run keeps param_ratio of its
    weights, so every partition costs the same parameters up to rank rounding). Statistics from the
    uncompressed model (one pass). Geo-Sharing (Zhang et al. 2025, "Rethinking Parameter Sharing as
    Graph Coloring for Structured Compression", arXiv:2511.06786) searches which layers share by a
    second-order criterion; this is the same question answered by the measured output error, on
    consecutive runs only. -> (partition, {type: {"error": searched, "error_private": all
    singletons, "error_uniform": runs of max_group}})."""
    from llmpress.walk import dense_statistics
    check_share(model, max_group, param_ratio)
    stats = dense_statistics(model, tokens, device, batch_size, progress)
    blocks = walk_blocks(model)
    n = len(blocks)
    partition, info = {}, {}
    for local in SHARED:
        w = [b.get_submodule(local).weight.detach().float() for b in blocks]
        h = [stats[f"{_prefix(model)}.{i}.{local}"].hessian().double() for i in range(n)]
        cost = {(i, k): segment_error(w[i:i + k], h[i:i + k], param_ratio)
                for i in range(n) for k in range(1, max_group + 1) if i + k <= n}
        best, back = [0.0] + [float("inf")] * n, [0] * (n + 1)
        for j in range(1, n + 1):                  # best[j]: blocks 0..j-1 partitioned
            for k in range(1, min(max_group, j) + 1):
                c = best[j - k] + cost[(j - k, k)]
                if c < best[j]:
                    best[j], back[j] = c, k
        runs, j = [], n
        while j:
            runs.append(list(range(j - back[j], j)))
            j -= back[j]
        partition[local] = runs[::-1]
        info[local] = {"error": best[n], "error_private": sum(cost[(i, 1)] for i in range(n)),
                       "error_uniform": sum(cost[(i, min(max_group, n - i))] for i in range(0, n, max_group))}
    return partition, info


def walk_blocks(model: nn.Module) -> nn.ModuleList:
    from llmpress.arch import adapter_for
    return adapter_for(model).blocks(model)


def _prefix(model: nn.Module) -> str:
    from llmpress.arch import adapter_for
    return adapter_for(model).blocks_path


def _rel_error(w: torch.Tensor, new: LowRankLinear, gram: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 from the Gram matrix: tr(D G D^T) / tr(W G W^T)."""
    d = w.double() - new.dense_weight().double()
    num = ((d @ gram) * d).sum().item()
    return num / max(((w.double() @ gram) * w.double()).sum().item(), 1e-30)


def _replace(block: nn.Module, local: str, new: nn.Module) -> None:
    parent, attr = local.rsplit(".", 1)
    old = block.get_submodule(local)
    setattr(block.get_submodule(parent), attr, new.to(old.weight.device))
