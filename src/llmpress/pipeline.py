"""The one block-by-block compression loop.

capture block-0 inputs -> for each block: collect the statistics its methods declare (hooks scoped
in `with`) -> apply the methods -> re-run the block on its compressed weights -> pass the outputs on.
Only one block's activations are held at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.arch import adapter_for
from llmpress.config import MethodConfig, group_transform_for, handler_for
from llmpress.errors import LLMPressError
from llmpress.stats import collect_inputs


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


def _run_block(block, hidden, kwargs, batch_size):
    outs = []
    for start in range(0, hidden.shape[0], batch_size):
        out = block(hidden[start:start + batch_size], **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def compress(model: nn.Module, layer_configs: dict[str, MethodConfig], tokens: torch.Tensor | None = None,
             batch_size: int = 8, progress: bool = True) -> CompressReport:
    """Compress `model` in place. layer_configs: {fqn: config} (a resolved Plan); tokens: (N, T)
    calibration token ids, needed when any config declares a statistic."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    unknown = set(layer_configs) - set(adapter.linear_names(model))
    if unknown:
        raise LLMPressError(f"not compressible linears of this model: {sorted(unknown)[:5]}")
    needs_data = any(c.stat is not None for c in layer_configs.values())
    if needs_data and (tokens is None or tokens.numel() == 0):
        raise LLMPressError("the plan uses calibrated methods but no calibration tokens were given")

    for fqn in layer_configs:
        if not torch.isfinite(model.get_submodule(fqn).weight).all():
            raise LLMPressError(f"{fqn} has NaN or infinite weights; refusing to compress")

    report = CompressReport()
    t0 = time.perf_counter()
    hidden = kwargs = None
    if needs_data:
        hidden, kwargs = capture_block_inputs(model, blocks, tokens, batch_size)

    prefix = adapter.blocks_path
    for i, block in enumerate(tqdm(blocks, desc="compress", unit="block", disable=not progress)):
        names = {f"{prefix}.{i}.{n}": n for group in adapter.input_groups for n in group}
        todo = {fqn: layer_configs[fqn] for fqn in names if fqn in layer_configs}
        stats = {}
        if needs_data and any(c.stat for c in todo.values()):
            stats = _collect_block_stats(block, adapter, prefix, i, todo, hidden, kwargs, batch_size)
        group_info = _group_transforms(block, adapter, f"{prefix}.{i}.", todo, stats)
        for fqn, config in todo.items():
            local = names[fqn]
            linear = block.get_submodule(local)
            t = time.perf_counter()
            new, info = handler_for(config)(linear, config, stats.get(local))
            _check_changed(fqn, linear, new)
            parent, _, attr = local.rpartition(".")
            setattr(block.get_submodule(parent), attr, new)
            report.layers[fqn] = {"method": config.label(), "seconds": time.perf_counter() - t,
                                  **group_info.get(local, {}), **info}
        if needs_data and i + 1 < len(blocks):
            with torch.no_grad():
                hidden = _run_block(block, hidden, kwargs, batch_size)   # (N, T, C) into block i+1
    report.seconds = time.perf_counter() - t0
    return report


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


def _collect_block_stats(block, adapter, prefix, i, todo, hidden, kwargs, batch_size):
    """One forward of the block with hooks on the first linear of every input group that needs a
    statistic; the group's members share it (same input tensor)."""
    hooked, members, gram = {}, {}, {}
    for group in adapter.input_groups:
        needing = [n for n in group if f"{prefix}.{i}.{n}" in todo and todo[f"{prefix}.{i}.{n}"].stat]
        if needing:
            hooked[group[0]] = block.get_submodule(group[0])
            members[group[0]] = needing
            # the (in, in) Gram matrix only when a member needs it; norms come with every statistic
            gram[group[0]] = any(todo[f"{prefix}.{i}.{n}"].stat == "hessian" for n in needing)
    with collect_inputs(hooked, gram) as stats, torch.no_grad():
        _run_block(block, hidden, kwargs, batch_size)
    return {m: stats[head] for head, ms in members.items() for m in ms}


def _check_changed(fqn, old, new) -> None:
    """A method that leaves the weights exactly as they were is a bug, not a result."""
    w_old = old.weight.detach().float()
    w_new = new.dense_weight()
    if not torch.isfinite(w_new).all():
        raise LLMPressError(f"{fqn}: compression produced non-finite weights")
    if torch.equal(w_old, w_new):
        raise LLMPressError(f"{fqn}: the method left the weights unchanged")

