"""The one block-by-block compression loop.

For each block of the walk (llmpress.walk): collect the statistics its methods declare (hooks
scoped in `with`) -> apply the methods -> re-run the block on its compressed weights -> pass the
outputs on. Only one block's activations are held at a time (two streams of them with a reference:
the compressed model's and the uncompressed model's).

Options that change what the statistics see (both off by default, as in the GPTQ reference):
sequential=True visits a block's input groups in order (q/k/v, then o, then gate/up, then down)
and measures each group's inputs after the groups before it were compressed ("true sequential"
of the GPTQ / AutoGPTQ code); reference=alpha fits the layers whose methods minimize the output
error through the Gram matrix to the uncompressed model's outputs (asymmetric calibration, GPTAQ;
llmpress.methods.hessian.toward_reference).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmpress.arch.moe import all_experts_calibration, router_weighted_calibration
from llmpress.config import MethodConfig, group_solver_for, group_transform_for, handler_for
from llmpress.distributed import broadcast_results
from llmpress.errors import LLMPressError
from llmpress.methods.hessian import toward_reference
from llmpress.modules import dense_weights_kept
from llmpress.rotate import fold_online
from llmpress.stats import StatsCache, block_key, tokens_digest, with_prior
from llmpress.recover import fisher_diagonal
from llmpress.tune import tune_block
from llmpress.walk import BlockWalk


@dataclass
class CompressReport:
    seconds: float = 0.0
    layers: dict[str, dict] = field(default_factory=dict)    # fqn -> {method, seconds, info...}
    device: str = "cpu"
    reduced_bytes: int = 0     # under torch.distributed: statistics bytes this rank all-reduced


def compress(model: nn.Module, layer_configs: dict[str, MethodConfig], tokens: torch.Tensor | None = None,
             batch_size: int = 8, progress: bool = True, propagate: bool = True,
             stats_cache: str | Path | None = None, measure_error: bool = False,
             device: str | torch.device | None = "cpu", source=None, checkpoint=None,
             sequential: bool = False, reference: float = 0.0, tune: int = 0,
             min_expert_tokens: int = 128, calibrate_all_experts: bool = False,
             router_weighted: bool = False) -> CompressReport:
    """Compress `model` in place. layer_configs: {fqn: config} (a resolved Plan); tokens: (N, T)
    calibration token ids, needed when any config declares a statistic.

    propagate=True (default, as GPTQ / SparseGPT): block i's statistics are measured on the outputs
    of the already-compressed blocks 0..i-1, at the cost of a second forward per block.
    propagate=False: one forward per block through the dense model; its statistics do not depend
    on the methods, so they can be cached on disk (`stats_cache`) and reused across a sweep.
    measure_error=True records each layer's relative output error ||(W - W') X||^2 / ||W X||^2 on the
    calibration inputs (exact, from the Gram matrix), also for data-free methods.
    device: where each block and its solves run (weights wait on the CPU between blocks); source:
    an llmpress.offload.OffloadedCheckpoint the blocks are read from (models larger than memory);
    checkpoint: an llmpress.checkpoint.Checkpoint that records every finished block, and whose
    recorded blocks are restored instead of compressed again (resume after a kill).
    sequential=True: each input group's statistics are measured after the groups before it in the
    block were compressed (one forward per group, each stopped at the group's first linear).
    reference=alpha in (0, 1]: a second stream of hidden states runs through the uncompressed
    blocks, and layers whose method takes the Gram matrix ("hessian" statistic) are fitted a share
    alpha of the way to the uncompressed model's outputs (GPTAQ's asymmetric calibration; its code
    uses 0.25). Costs one more forward per block and a second copy of the activations.
    tune=E: after a block's layers are compressed, E epochs of gradient descent fit its quantized
    layers' scales and its norm weights to the uncompressed block's outputs (llmpress.tune; the
    target is the reference stream's when there is one).
    Layers with an online rotation (llmpress.rotate.rotate_online) are compressed in the rotated
    basis and keep it; those left dense get it folded back at the end.
    Mixtures of experts: each expert's statistics come from the tokens the router sends to it; an
    expert that got fewer than `min_expert_tokens` has its statistics damped toward isotropic ones
    (with none: the data-free solution), recorded per layer as `tokens` and `expert_fallback`.
    calibrate_all_experts=True runs every expert on every token for the statistics while the
    block's outputs still add only the routed experts (llm-compressor's default; E / k times the
    expert compute). router_weighted=True weighs each routed token's contribution to an expert's
    statistics by its router weight (arch.moe.router_weighted_calibration).
    """
    walk = BlockWalk(model, device, batch_size, progress, source)
    adapter, blocks = walk.adapter, walk.blocks
    unknown = set(layer_configs) - set(adapter.linear_names(model))
    if unknown:
        raise LLMPressError(f"not compressible linears of this model: {sorted(unknown)[:5]}")
    fits = {fqn: f for fqn, c in layer_configs.items() if (f := block_fit(c))}     # ApiQ-style block fits
    stream = bool(reference) or bool(fits)          # a second stream through the uncompressed blocks
    needs_data = measure_error or bool(tune) or bool(fits) or any(c.stat is not None for c in layer_configs.values())
    if needs_data and (tokens is None or tokens.numel() == 0):
        raise LLMPressError("the plan uses calibrated methods (or measure_error) but no calibration tokens were given")
    if stats_cache is not None and propagate:
        raise LLMPressError("a statistics cache needs propagate=False (propagated statistics depend on the methods)")
    if not 0 <= reference <= 1:
        raise LLMPressError(f"reference (the share of the way to the uncompressed outputs) must be in [0, 1], got {reference!r}")
    if (sequential or reference or tune) and not propagate:
        raise LLMPressError("sequential / reference / tune work on compressed inputs: they need propagate=True")
    if tune and (tokens is None or tokens.numel() == 0):
        raise LLMPressError("tune fits blocks on calibration data: give calibration tokens")
    if tune and walk.world > 1:
        raise LLMPressError("tune is single-process for now; run without torchrun")
    if fits and not propagate:
        raise LLMPressError(f"{next(iter(fits))}: its method fits each block on compressed inputs: it needs propagate=True")
    if fits and walk.world > 1:
        raise LLMPressError("block fits (apiq) are single-process for now; run without torchrun")
    salient = [fqn for fqn, f in fits.items() if f.get("saliency_weight")]
    if salient and source is not None:
        raise LLMPressError("the saliency term needs the whole uncompressed model's gradients: not with an offloaded model")
    if reference and not any(c.stat == "hessian" for c in layer_configs.values()):
        raise LLMPressError("reference (asymmetric calibration) needs a method that takes the Gram matrix "
                            "(gptq, sparsegpt, awq, gptq-lr, svd-llm ...); this plan has none")
    if min_expert_tokens < 1:
        raise LLMPressError(f"min_expert_tokens must be >= 1, got {min_expert_tokens!r}")
    if calibrate_all_experts and adapter.moe is None:
        raise LLMPressError("calibrate_all_experts applies to mixtures of experts; this model has none")
    if router_weighted and (adapter.moe is None or calibrate_all_experts):
        raise LLMPressError("router-weighted statistics apply to a mixture of experts' routed tokens (not with "
                            "calibrate_all_experts, whose extra tokens have no router weight)")
    if stream and adapter.moe is not None and not calibrate_all_experts:
        raise LLMPressError("reference (asymmetric calibration) on a mixture of experts needs calibrate_all_experts: "
                            "the two streams route different tokens to each expert")
    if walk.world > 1 and (checkpoint is not None or stats_cache is not None):
        raise LLMPressError("checkpoints and statistics caches are single-process; under torchrun run without them")
    problems = [f"{fqn}: {why}" for fqn, c in layer_configs.items()
                if (why := c.shape_problem(*_shape(model, fqn))) is not None]
    if problems:
        raise LLMPressError(f"{len(problems)} layer(s) cannot take their method: " + "; ".join(problems[:3]) +
                            (" ..." if len(problems) > 3 else ""))
    if source is None:       # offloaded weights are checked as each block is read
        for fqn in layer_configs:
            check_finite(fqn, model.get_submodule(fqn).weight)

    report = CompressReport(device=str(walk.device))
    t0 = time.perf_counter()
    # the diagonal empirical Fisher of the uncompressed model, for the saliency term of block fits
    fisher = fisher_diagonal(model, tokens, salient, batch_size, progress) if salient else {}
    cache = StatsCache(stats_cache) if stats_cache is not None else None
    keys = cached = hidden = hidden_ref = None
    if cache is not None and needs_data:
        if source is not None:
            raise LLMPressError("a statistics cache is not supported together with an offloaded model")
        digest = tokens_digest(tokens)
        keys = [block_key(b, digest, i) for i, b in enumerate(blocks)]
        cached = all(cache.has(k) for k in keys)
    start = 0 if checkpoint is None else checkpoint.done
    if checkpoint is not None and cache is not None:
        raise LLMPressError("a statistics cache and a checkpoint do not go together; use one or the other")
    if source is not None:
        source.forget_blocks_from(start)               # a block file the checkpoint did not record is redone
    for i, entries in (checkpoint.entries().items() if start else ()):
        if source is None:
            checkpoint.restore_block(blocks[i], i)
        report.layers.update(entries)
    if needs_data and start == 0 and not cached:
        hidden = walk.capture(tokens)
        hidden_ref = hidden.clone() if stream else None     # block 0 sees the same inputs in both models
    elif needs_data and 0 < start < len(blocks):
        saved = checkpoint.tensors("hidden")
        hidden = walk.resume(tokens, saved["hidden"])
        if stream:
            if "reference" not in saved:
                raise LLMPressError("this checkpoint was written without a reference stream; start again without --resume")
            hidden_ref = saved["reference"].to(walk.storage)

    for i, block in walk.steps("compress", order=range(start, len(blocks))):
        prefix = f"{walk.prefix}.{i}."
        todo = {prefix + n: layer_configs[prefix + n] for g in adapter.input_groups for n in g
                if prefix + n in layer_configs}
        if source is not None:
            for fqn in todo:
                check_finite(fqn, model.get_submodule(fqn).weight)
        dense_block = copy.deepcopy(block) if stream or tune else None   # the uncompressed block (reference stream, fit target)
        ref_out = None
        # one pass over all input groups, or (sequential) one per group in order
        passes = [[g] for g in adapter.input_groups] if sequential else [list(adapter.input_groups)]
        for groups in passes:
            part = {prefix + n: todo[prefix + n] for g in groups for n in g if prefix + n in todo}
            if sequential and not part:
                continue
            stats = {}
            if needs_data and cached:
                stats = walk.share({k: v.to(walk.device) for k, v in cache.load(keys[i]).items()})
            elif needs_data and (any(c.stat for c in part.values()) or not propagate or measure_error):
                # one forward with hooks; without propagation its outputs feed the next block
                all_groups = cache is not None or measure_error   # a cache entry serves any later method
                with all_experts_calibration(block, calibrate_all_experts), dense_weights_kept(block), \
                        router_weighted_calibration(block, router_weighted), \
                        all_experts_calibration(dense_block, calibrate_all_experts and reference):
                    hidden_out, stats, out = walk.gather(block, hidden, _heads(adapter, prefix, part, all_groups, groups),
                                                         (dense_block, hidden_ref) if reference else None, stop=sequential)
                ref_out = out if out is not None else ref_out
                if cache is not None:
                    cache.save(keys[i], {g[0]: stats[g[0]] for g in adapter.input_groups if g[0] in stats})
                if not propagate:
                    hidden = hidden_out
            stats, notes = _expert_priors(adapter, stats, min_expert_tokens)
            originals = _toward_reference(block, prefix, part, stats, reference) if reference else {}
            _compress_groups(block, adapter, prefix, part, stats, walk, report, measure_error, originals)
            for local, note in notes.items():
                if prefix + local in report.layers:
                    report.layers[prefix + local].update(note)
        if stream and needs_data and ref_out is None:
            with torch.no_grad():
                ref_out = walk.run(dense_block, hidden_ref)
        block_fits = {fqn: fits[fqn] for fqn in todo if fqn in fits}
        if tune and todo:
            with torch.no_grad():
                target = ref_out if reference else walk.run(dense_block, hidden)
            info = tune_block(block, walk, hidden, target, tune)
            for fqn in todo:
                report.layers[fqn]["tune"] = info
        if block_fits:
            # ApiQ-bw: the uncompressed model's outputs and the uncompressed block's on compressed inputs
            with torch.no_grad():
                targets = [ref_out, walk.run(dense_block, hidden)]
            fit = _merge_fits(list(block_fits.values()))
            saliency = {fqn[len(prefix):]: (fisher[fqn], dense_block.get_submodule(fqn[len(prefix):]).weight.detach())
                        for fqn in block_fits if fqn in fisher}
            info = tune_block(block, walk, hidden, targets, fit.pop("epochs"), saliency=saliency, **fit)
            for fqn in block_fits:
                report.layers[fqn]["block_fit"] = info
                fisher.pop(fqn, None)
        if needs_data and propagate and i + 1 < len(blocks):
            with torch.no_grad(), dense_weights_kept(block):      # each weight built once, not once per batch
                hidden = walk.run(block, hidden)   # (N, T, C) into block i+1
            hidden_ref = ref_out if stream else None
        if checkpoint is not None:
            more = i + 1 < len(blocks) and needs_data
            checkpoint.save_block(block, i, hidden if more else None,
                                  {k: v for k, v in report.layers.items() if k.startswith(prefix)},
                                  reference=hidden_ref if more and stream else None)
    if source is not None:
        source.load_all(model)            # the finished (compressed) blocks back from the scratch folder
    fold_online(model)                    # layers left dense: their online rotation is pure cost
    report.seconds = time.perf_counter() - t0
    report.reduced_bytes = walk.reduced_bytes
    return report


def block_fit(config: MethodConfig) -> dict | None:
    """The block fit a layer's method asks the walk for after its block is compressed (ApiQ: the
    adapters and scales of llmpress.tune.tune_block), or None."""
    fit = getattr(config, "block_fit", None)
    return fit() if fit is not None else None


def _merge_fits(fits: list[dict]) -> dict:
    """One tune_block call for a block whose layers ask for fits: the most epochs, the first's rates."""
    out = dict(fits[0])
    out["epochs"] = max(f["epochs"] for f in fits)
    out["saliency_weight"] = max(f.get("saliency_weight", 0.0) for f in fits)
    return out


def _compress_groups(block, adapter, prefix, todo, stats, walk, report, measure_error, originals) -> None:
    """Run the group transforms and solvers of `todo` (some input groups of block `prefix`) and put
    the compressed modules in place, recording each layer in `report`. originals: {local: weight
    before a reference shift} (the error is measured against the layer as it was)."""
    group_info = _group_transforms(block, adapter, prefix, todo, stats)
    for k, (members, config, t, results) in enumerate(_solve(block, adapter, prefix, todo, stats, walk)):
        if walk.world > 1:            # solved by one rank, broadcast to all
            results = broadcast_results(results, k % walk.world, walk.device)
        for local, (new, info) in zip(members, results):
            old = block.get_submodule(local)
            new = new.to(old.weight.device)
            before = originals.get(local, {}).get("weight", old.weight)
            if _check_changed(prefix + local, before, new, config):
                info = {**info, "lossless": "the weights already lie on this grid"}
            if measure_error and local not in group_info and local in stats:
                info = {**info, "output_error": relative_output_error(before, new.dense_weight(), stats[local])}
            parent, _, attr = local.rpartition(".")
            setattr(block.get_submodule(parent), attr, new)
            shift = {k: v for k, v in originals.get(local, {}).items() if k != "weight"}
            report.layers[prefix + local] = {"method": config.label(), "seconds": t / len(members),
                                             **group_info.get(local, {}), **shift, **info}


def _expert_priors(adapter, stats: dict, min_tokens: int) -> tuple[dict, dict[str, dict]]:
    """Routed experts' statistics with llmpress.stats.with_prior applied (members of a group share
    the new object). Returns (statistics, {local: {"tokens": n, ["expert_fallback": what was done]}})."""
    if adapter.moe is None:
        return stats, {}
    out, notes, done = dict(stats), {}, {}
    for local, st in stats.items():
        if not adapter.is_expert(local):
            continue
        if id(st) not in done:
            done[id(st)] = with_prior(st, min_tokens)
        new, note = done[id(st)]
        out[local] = new
        notes[local] = note or {"tokens": st.count}
    return out, notes


def _toward_reference(block, prefix, todo, stats, alpha) -> dict[str, dict]:
    """Move the weight of every layer in `todo` whose method takes the Gram matrix a share alpha of
    the way to its least-squares fit of the uncompressed outputs (in place, before its solver);
    returns {local: {"weight": the weight before, "reference_shift": ||shift|| / ||W||}}."""
    out = {}
    for fqn, config in todo.items():
        local = fqn[len(prefix):]
        if config.stat != "hessian" or local not in stats:
            continue
        linear = block.get_submodule(local)
        before = linear.weight.detach().clone()
        target, rel = toward_reference(before, stats[local], alpha)
        linear.weight.data = target.to(before.dtype)
        out[local] = {"weight": before, "reference": alpha, "reference_shift": round(rel, 6)}
    return out


def _shape(model: nn.Module, fqn: str) -> tuple[int, int]:
    m = model.get_submodule(fqn)
    return m.out_features, m.in_features


def check_finite(fqn: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise LLMPressError(f"{fqn} has NaN or infinite weights; refusing to compress")


def _heads(adapter, prefix: str, todo: dict, all_groups: bool, groups=None) -> dict[str, bool]:
    """The first linear of every input group (of `groups`, default all) that needs a statistic (of
    every group with all_groups) -> whether its (in, in) Gram matrix is needed (norms come with
    every statistic)."""
    heads = {}
    for group in adapter.input_groups if groups is None else groups:
        needed = {c.stat for n in group if (c := todo.get(prefix + n)) is not None and c.stat}
        if needed or all_groups:
            heads[group[0]] = all_groups or "hessian" in needed
    return heads


def relative_output_error(w_old: torch.Tensor, w_new: torch.Tensor, stats) -> float:
    """||(W - W') X||^2 / ||W X||^2 from the Gram matrix G = X^T X: tr(D G D^T) / tr(W G W^T)."""
    g = stats.gram_matrix()
    w_old = w_old.detach().float()
    d = w_old - w_new
    return ((d @ g) * d).sum().item() / max(((w_old @ g) * w_old).sum().item(), 1e-30)


def _solve(block, adapter, prefix, todo, stats, walk):
    """Yields (members, config, seconds, [(module, info)]): one job per input group whose members
    share a config and whose method has a group solver, one per layer otherwise. Under
    torch.distributed job k is solved by rank k % world only (the others get None)."""
    jobs = []
    for group in adapter.input_groups:
        present = [n for n in group if prefix + n in todo]
        configs = [todo[prefix + n] for n in present]
        solver = group_solver_for(configs[0]) if configs else None
        if solver is not None and len(present) > 1 and all(c == configs[0] for c in configs):
            jobs.append((present, configs[0], solver))
        else:
            jobs += [([n], c, None) for n, c in zip(present, configs)]
    for k, (members, config, solver) in enumerate(jobs):
        if k % walk.world != walk.rank:
            yield members, config, 0.0, None
            continue
        t = time.perf_counter()
        if solver is not None:
            results = solver([block.get_submodule(n) for n in members], config, stats.get(members[0]))
        else:
            results = [handler_for(config)(block.get_submodule(members[0]), config, stats.get(members[0]))]
        yield members, config, time.perf_counter() - t, results


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


def _check_changed(fqn, weight, new, config) -> bool:
    """A method that leaves the weights exactly as they were is a bug, not a result, except a
    quantizer whose (compressed, smaller) layer holds weights that already lay on its grid (a
    checkpoint that went through Q4_1, stored as Q5_1 or Q8_0: lossless). Returns True then."""
    w_old = weight.detach().float()
    w_new = new.dense_weight()
    if not torch.isfinite(w_new).all():
        raise LLMPressError(f"{fqn}: compression produced non-finite weights")
    if not torch.equal(w_old, w_new):
        return False
    smaller = hasattr(new, "stored_bytes") and new.stored_bytes() < weight.numel() * 2      # below fp16
    if config.family == "quantization" and smaller:
        return True
    raise LLMPressError(f"{fqn}: the method left the weights unchanged")

