"""The one block-by-block compression loop.

capture block-0 inputs -> for each block: collect the statistics its methods declare (hooks scoped
in `with`) -> apply the methods -> re-run the block on its compressed weights -> pass the outputs on.
Only one block's activations are held at a time.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.arch import adapter_for
from llmpress.config import MethodConfig, group_solver_for, group_transform_for, handler_for
from llmpress.errors import LLMPressError
from llmpress.modules import CompressedLinear
from llmpress.stats import StatsCache, block_key, collect_inputs, tokens_digest


@dataclass
class CompressReport:
    seconds: float = 0.0
    layers: dict[str, dict] = field(default_factory=dict)    # fqn -> {method, seconds, info...}


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int):
    """Run the model up to block 0. Returns (hidden (N, T, C), kwargs block 0 was called with:
    position embeddings, masks... identical for every batch of the same shape)."""
    captured: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def hook(module, args, kwargs):
        captured.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            try:
                model(tokens[start:start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen["use_cache"] = False
    return torch.cat(captured), kwargs_seen


def block_hidden(out):
    """A decoder block's output hidden states (some versions return a tuple, some the tensor)."""
    return out[0] if isinstance(out, tuple) else out


def _run_block(block, hidden, kwargs, batch_size):
    outs = []
    for start in range(0, hidden.shape[0], batch_size):
        outs.append(block_hidden(block(hidden[start:start + batch_size], **kwargs)))
    return torch.cat(outs)


def compress(model: nn.Module, layer_configs: dict[str, MethodConfig], tokens: torch.Tensor | None = None,
             batch_size: int = 8, progress: bool = True, propagate: bool = True,
             stats_cache: str | Path | None = None, measure_error: bool = False) -> CompressReport:
    """Compress `model` in place. layer_configs: {fqn: config} (a resolved Plan); tokens: (N, T)
    calibration token ids, needed when any config declares a statistic.

    propagate=True (default, as GPTQ / SparseGPT): block i's statistics are measured on the outputs
    of the already-compressed blocks 0..i-1, at the cost of a second forward per block.
    propagate=False: one forward per block through the dense model; its statistics do not depend
    on the methods, so they can be cached on disk (`stats_cache`) and reused across a sweep.
    measure_error=True records each layer's relative output error ||(W - W') X||^2 / ||W X||^2 on the
    calibration inputs (exact, from the Gram matrix), also for data-free methods.
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    unknown = set(layer_configs) - set(adapter.linear_names(model))
    if unknown:
        raise LLMPressError(f"not compressible linears of this model: {sorted(unknown)[:5]}")
    needs_data = measure_error or any(c.stat is not None for c in layer_configs.values())
    if needs_data and (tokens is None or tokens.numel() == 0):
        raise LLMPressError("the plan uses calibrated methods (or measure_error) but no calibration tokens were given")
    if stats_cache is not None and propagate:
        raise LLMPressError("a statistics cache needs propagate=False (propagated statistics depend on the methods)")
    for fqn in layer_configs:
        if not torch.isfinite(model.get_submodule(fqn).weight).all():
            raise LLMPressError(f"{fqn} has NaN or infinite weights; refusing to compress")

    report = CompressReport()
    t0 = time.perf_counter()
    prefix = adapter.blocks_path
    cache = StatsCache(stats_cache) if stats_cache is not None else None
    keys = cached = None
    if cache is not None and needs_data:
        digest = tokens_digest(tokens)
        keys = [block_key(b, digest, i) for i, b in enumerate(blocks)]
        cached = all(cache.has(k) for k in keys)
    hidden = kwargs = None
    if needs_data and not cached:
        hidden, kwargs = capture_block_inputs(model, blocks, tokens, batch_size)

    for i, block in enumerate(tqdm(blocks, desc="compress", unit="block", disable=not progress)):
        names = {f"{prefix}.{i}.{n}": n for group in adapter.input_groups for n in group}
        todo = {fqn: layer_configs[fqn] for fqn in names if fqn in layer_configs}
        stats = {}
        if needs_data and cached:
            stats = _share(cache.load(keys[i]), adapter)
        elif needs_data and (any(c.stat for c in todo.values()) or not propagate or measure_error):
            # one forward with hooks; without propagation its outputs feed the next block
            all_groups = cache is not None or measure_error   # a cache entry serves any later method
            hidden_out, stats = _collect_block_stats(block, adapter, prefix, i, todo, hidden, kwargs,
                                                     batch_size, all_groups=all_groups)
            if cache is not None:
                cache.save(keys[i], {g[0]: stats[g[0]] for g in adapter.input_groups if g[0] in stats})
            if not propagate:
                hidden = hidden_out
        group_info = _group_transforms(block, adapter, f"{prefix}.{i}.", todo, stats)
        for members, config, t, results in _solve(block, adapter, f"{prefix}.{i}.", todo, stats):
            for local, (new, info) in zip(members, results):
                fqn = f"{prefix}.{i}.{local}"
                old = block.get_submodule(local)
                _check_changed(fqn, old, new)
                if measure_error and local not in group_info and local in stats:
                    info = {**info, "output_error": relative_output_error(old.weight, new.dense_weight(), stats[local])}
                parent, _, attr = local.rpartition(".")
                setattr(block.get_submodule(parent), attr, new)
                report.layers[fqn] = {"method": config.label(), "seconds": t / len(members),
                                      **group_info.get(local, {}), **info}
        if needs_data and propagate and i + 1 < len(blocks):
            with torch.no_grad():
                hidden = _run_block(block, hidden, kwargs, batch_size)   # (N, T, C) into block i+1
    report.seconds = time.perf_counter() - t0
    return report


def relative_output_error(w_old: torch.Tensor, w_new: torch.Tensor, stats) -> float:
    """||(W - W') X||^2 / ||W X||^2 from the Gram matrix G = X^T X: tr(D G D^T) / tr(W G W^T)."""
    g = stats.gram_matrix()
    w_old = w_old.detach().float()
    d = w_old - w_new
    return ((d @ g) * d).sum().item() / max(((w_old @ g) * w_old).sum().item(), 1e-30)


def _share(stats_by_head: dict, adapter) -> dict:
    """Statistics keyed by each group's first member -> keyed by every member of the group."""
    return {n: stats_by_head[g[0]] for g in adapter.input_groups if g[0] in stats_by_head for n in g}


def _solve(block, adapter, prefix, todo, stats):
    """Yields (members, config, seconds, [(module, info)]): one call per input group whose members
    share a config and whose method has a group solver, one call per layer otherwise."""
    for group in adapter.input_groups:
        present = [n for n in group if prefix + n in todo]
        configs = [todo[prefix + n] for n in present]
        solver = group_solver_for(configs[0]) if configs else None
        if solver is not None and len(present) > 1 and all(c == configs[0] for c in configs):
            t = time.perf_counter()
            results = solver([block.get_submodule(n) for n in present], configs[0], stats.get(present[0]))
            yield present, configs[0], time.perf_counter() - t, results
            continue
        for n, config in zip(present, configs):
            t = time.perf_counter()
            result = handler_for(config)(block.get_submodule(n), config, stats.get(n))
            yield [n], config, time.perf_counter() - t, [result]


def _group_transforms(block, adapter, prefix, todo, stats) -> dict[str, dict]:
    """Run each method's group transform on input groups whose members all use that method."""
    infos = {}
    for group in adapter.input_groups:
        configs = [todo.get(prefix + n) for n in group]
        if configs[0] is None or any(c is None or c.method != configs[0].method for c in configs):
            for n, c in zip(group, configs):   # a transform needs the whole group: say it was skipped
                if c is not None and group_transform_for(c) is not None:
                    infos[n] = {c.method: "input group not uniformly this method: no group transform"}
            continue
        transform = group_transform_for(configs[0])
        if transform is not None:
            info = transform(block, adapter, group[0], list(group), configs, stats.get(group[0]))
            infos.update({n: info for n in group})
    return infos


def _collect_block_stats(block, adapter, prefix, i, todo, hidden, kwargs, batch_size, all_groups=False):
    """One forward of the block with hooks on the first linear of every input group that needs a
    statistic (every group with all_groups); members share it (same input tensor).
    Returns (block outputs (N, T, C), {member: InputStats})."""
    hooked, gram = {}, {}
    for group in adapter.input_groups:
        configs = [todo.get(f"{prefix}.{i}.{n}") for n in group]
        stats_needed = {c.stat for c in configs if c is not None and c.stat}
        if stats_needed or all_groups:
            hooked[group[0]] = block.get_submodule(group[0])
            # the (in, in) Gram matrix only when needed; norms come with every statistic
            gram[group[0]] = all_groups or "hessian" in stats_needed
    with collect_inputs(hooked, gram) as stats, torch.no_grad():
        out = _run_block(block, hidden, kwargs, batch_size)
    return out, _share(stats, adapter)


def _check_changed(fqn, old, new) -> None:
    """A method that leaves the weights exactly as they were is a bug, not a result."""
    w_old = old.weight.detach().float()
    w_new = new.dense_weight()
    if not torch.isfinite(w_new).all():
        raise LLMPressError(f"{fqn}: compression produced non-finite weights")
    if torch.equal(w_old, w_new):
        raise LLMPressError(f"{fqn}: the method left the weights unchanged")
    if new._weight_cache is None and type(new).forward is CompressedLinear.forward:
        new._weight_cache = w_new            # built anyway: spare the first forward rebuilding it

