"""The compress workflow as a library call: a model, an output folder and a `Recipe` in, the run's
results out. The CLI (`llmpress compress` / `llmpress plan`), Python users and bench/ all call
`compress` / `plan` here; nothing below reads command-line arguments.

    from llmpress import Recipe
    from llmpress.workflow import compress, plan
    r = Recipe.resolve("gguf-4bit", num_samples=32)       # preset < these fields
    plan("smollm2-135m", r)                                # the allocation only (llmpress plan)
    compress("smollm2-135m", "out", r)                     # OUT/llmpress.json records r in full

Machine settings (device, offload folder, resume, overwrite, trust_remote_code) are keyword
arguments, not recipe fields: they change where and how a run happens, never its result.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmpress.errors import LLMPressError
from llmpress.recipe import Recipe


@dataclass(frozen=True)
class _Job:
    """Where a run reads and writes, and on what machine (not part of the recipe)."""
    command: str                     # "compress" or "plan"
    model: str
    out: str | None = None
    device: str = "cpu"
    offload: str | None = None
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False


def _recipe(recipe, options: dict) -> Recipe:
    return recipe if isinstance(recipe, Recipe) and not options else Recipe.resolve(recipe, **options)


def compress(model: str, out: str | Path, recipe: "Recipe | str | dict | None" = None, *, device: str = "cpu",
             offload: str | None = None, resume: bool = False, overwrite: bool = False,
             trust_remote_code: bool = False, **options) -> dict:
    """Compress `model` into the llmpress folder `out` (and the target's export inside it).

    recipe: a Recipe, a preset name, a recipe file, an llmpress output (its recorded recipe) or a
    dict of fields; `options` override its fields (compress option names: budget="bits=4",
    num_samples=32, ...). Returns the run's results (sizes, seconds, allocation, export path)."""
    job = _Job("compress", str(model), str(out), device, offload, resume, overwrite, trust_remote_code)
    return _run(_recipe(recipe, options), job)


def plan(model: str, recipe: "Recipe | str | dict | None" = None, *, device: str = "cpu",
         trust_remote_code: bool = False, **options) -> dict:
    """The allocation of the recipe's `budget` without compressing: {"allocation": sizes and
    predicted loss, "plan": the Plan as data (`compress(..., plan=that)` runs it), "layers", "recipe"}."""
    job = _Job("plan", str(model), None, device, trust_remote_code=trust_remote_code)
    return _run(_recipe(recipe, options), job)


def _run(r: Recipe, job: _Job) -> dict:
    """Checks before any work, the model loaded, then `_compress_loaded`."""
    from llmpress.export import check_out_dir
    from llmpress.plan import Plan

    if job.command == "plan" and not r.budget:
        raise LLMPressError("plan allocates a --budget (give --budget, or a recipe with one)")
    structural = (r.drop_blocks is not None or r.prune_width is not None or r.prune_experts is not None
                  or r.merge_experts is not None)
    if r.prune_experts is not None and r.merge_experts is not None:
        raise LLMPressError("give --prune-experts or --merge-experts, not both")
    given = sum(x is not None for x in (r.method, r.plan, r.budget))
    if r.share_search and r.share_basis is None:
        raise LLMPressError("--share-search needs --share-basis N (the largest group)")
    if r.share_basis is not None and (given or r.online_hadamard or r.recover is not None):
        raise LLMPressError("--share-basis compresses every block linear itself: give it without --method, --plan, "
                            "--budget, --online-hadamard or --recover")
    structural = structural or r.share_basis is not None
    if given > 1 or (given == 0 and not structural):
        raise LLMPressError("give exactly one of --method, --plan or --budget (or none, with --drop-blocks, "
                            "--prune-width, --prune-experts, --merge-experts or --share-basis alone)")
    from llmpress.targets import check_extras
    check_extras(r.target, r.to_dict())
    if r.target == "vllm" and r.budget:
        if r.allocator in ("search", "refine"):
            raise LLMPressError("--target vllm: the layers vLLM fuses share one choice, which the knapsack and "
                                "lagrange allocators support (not search / refine)")
        r = r.replace(fuse=True)
    if r.fuse and (not r.budget or r.allocator in ("search", "refine")):
        raise LLMPressError("--fuse applies to --budget with the knapsack or lagrange allocator")
    budget = None
    if r.budget:
        from llmpress.budget import DEFAULT_MENU, Budget, menu_configs
        budget = Budget.parse(r.budget)
        menu_configs(r.menu or DEFAULT_MENU[budget.metric])       # a bad menu fails before loading
        plan = None
    else:
        plan = (_load_plan(r.plan) if r.plan else Plan.uniform(r.method_config()) if r.method
                else Plan([("*", None)]))       # structural pruning only
    if r.gguf_fallback:
        from llmpress.plan import check_gguf_fallback
        check_gguf_fallback(r.gguf_fallback)
    if job.out is not None:
        check_out_dir(job.out, job.overwrite)
    from llmpress.walk import resolve_device, resolve_dtype
    from llmpress.distributed import init_from_env, local_device
    device = resolve_device(job.device)
    if init_from_env(device):                       # under torchrun: data-parallel calibration
        device = local_device(device)
        if r.budget or job.resume:
            raise LLMPressError("under torchrun, compress supports --method / --plan without --resume "
                                "(the sensitivity table and checkpoints are single-process)")
    dtype = resolve_dtype(r.dtype, device)
    from llmpress.models import load_for_compress
    out = Path(job.out) if job.command == "compress" else Path(tempfile.gettempdir()) / "llmpress-plan"
    model, tokenizer, source, scratch = load_for_compress(job.model, dtype, job.offload, out,
                                                          trust_remote_code=job.trust_remote_code)
    return _compress_loaded(r, job, model, tokenizer, source, plan, budget, device, scratch)


def _load_plan(plan):
    """--plan FILE, or the Plan itself as a recipe records it."""
    from llmpress.plan import Plan
    return Plan.from_dict(plan) if isinstance(plan, dict) else Plan.load(plan)


def _shapes(model, names) -> dict[str, tuple[int, int]]:
    """{fqn: (out_features, in_features)} of the named linears."""
    return {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in names}


def _check_target(r: Recipe, model, layer_configs) -> None:
    """Refuse, naming the layers, what --target cannot serve (before the layers are compressed)."""
    if r.target == "llmpress":
        return
    from llmpress.targets import refuse_problems, target_problems
    shapes = _shapes(model, layer_configs)
    refuse_problems(r.target, target_problems(r.target, layer_configs, shapes))


def _online_layers(model, spec: str) -> list[str]:
    """'down_proj,self_attn.o_proj' -> the block-local names they end with (each must match one)."""
    from llmpress.arch import adapter_for
    local = [n for g in adapter_for(model).input_groups for n in g]
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        hits = [n for n in local if n == item or n.endswith("." + item)]
        if len(hits) != 1:
            raise LLMPressError(f"--online-hadamard: {item!r} matches {hits or 'no'} block linear(s); choose from {', '.join(local)}")
        out.append(hits[0])
    return out


def _compress_loaded(r: Recipe, job: _Job, model, tokenizer, source, plan, budget, device, scratch) -> dict:
    from llmpress.arch import adapter_for
    from llmpress.export import save_compressed
    from llmpress.pipeline import compress
    from llmpress.data import calibration_tokens
    from llmpress.eval import model_size

    allocation = tokens = calib = rotation = experts = None
    structure = {}
    if r.target == "llama.cpp":
        from llmpress.gguf_arch import check_exportable
        check_exportable(model.config)      # what llama.cpp computes differently: refused before any work

    def calibration():
        """The calibration windows, read once, on first need."""
        nonlocal tokens
        if tokens is None:
            tokens = calibration_tokens(tokenizer, r.calib, r.num_samples, r.seq_len, r.seed)
        return tokens

    for flag, value in (("--drop-blocks", r.drop_blocks), ("--prune-width", r.prune_width),
                        ("--share-basis", r.share_basis),
                        ("--prune-experts", r.prune_experts), ("--merge-experts", r.merge_experts),
                        ("--rotate", r.rotate),
                        ("--online-hadamard", r.online_hadamard)):
        if value is not None and value != "" and source is not None:
            raise LLMPressError(f"{flag} needs the whole model in memory (not with --offload)")
    if r.share_basis is not None:
        from llmpress.sharing import check_share
        check_share(model, r.share_basis, r.share_ratio)          # before any other work
    if r.drop_blocks is not None:
        from llmpress.depth import check_drop_count, choose_blocks, drop_blocks
        check_drop_count(model, r.drop_blocks)                    # before reading calibration text
        chosen, why = choose_blocks(model, calibration(), r.drop_blocks, r.block_criterion, device=device)
        structure["depth"] = {"criterion": r.block_criterion, **drop_blocks(model, chosen), **why}
        print(f"blocks: dropped {chosen} ({r.block_criterion}), {structure['depth']['blocks_after']} left",
              file=sys.stderr)
    if r.prune_width is not None:
        from llmpress.width import kept_width, prune_width
        k = kept_width(model, r.prune_width, r.width_multiple)     # checked before reading calibration text
        structure["width"] = {"share": r.prune_width,
                              **prune_width(model, calibration(), k, r.width_criterion, device=device)}
        print(f"MLP width: {structure['width']['intermediate_before']} -> {k} neurons ({r.width_criterion})",
              file=sys.stderr)
    if r.merge_experts is not None:
        from llmpress.experts import experts_to_keep, merge_experts, merge_groups, merge_stats
        keep = experts_to_keep(model, r.merge_experts)            # checked before reading calibration text
        stats = merge_stats(model, calibration(), device=device)
        experts = {"share": r.merge_experts, **merge_experts(model, merge_groups(stats, keep), stats)}
        print(f"experts: {experts['experts_before']} -> {experts['experts_after']} per layer (merged, MC-SMoE)",
              file=sys.stderr)
    if r.prune_experts is not None:
        from llmpress.experts import choose_experts, expert_scores, experts_to_keep, prune_experts
        keep = experts_to_keep(model, r.prune_experts)            # checked before reading calibration text
        scores = expert_scores(model, calibration(), device=device)
        experts = {"criterion": r.expert_criterion, "share": r.prune_experts,
                   **prune_experts(model, choose_experts(scores, keep, r.expert_criterion))}
        print(f"experts: {experts['experts_before']} -> {experts['experts_after']} per layer "
              f"({r.expert_criterion})", file=sys.stderr)
    if r.rotate:
        from llmpress.rotate import choose_rotation, rotate_model
        seed, searched = r.rotate_seed, None
        if r.rotate_search:
            seed, searched = choose_rotation(model, calibration(), r.rotate,
                                             range(r.rotate_seed, r.rotate_seed + r.rotate_search))
        rotation = rotate_model(model, r.rotate, seed)
        if searched:
            rotation["search"] = {str(k): v for k, v in searched.items()}
    if r.online_hadamard:
        from llmpress.rotate import rotate_online
        rotation = {**(rotation or {}), "online": rotate_online(model, _online_layers(model, r.online_hadamard),
                                                                r.rotate_seed)}
    if r.share_basis is not None:
        from llmpress.sharing import search_partition, share_basis
        partition = search = None
        if r.share_search:
            partition, search = search_partition(model, calibration(), r.share_ratio, r.share_basis, device=device)
        structure["basis_sharing"] = {**share_basis(model, calibration(), r.share_basis, r.share_ratio, partition,
                                                    device=device), "search": search}
        groups = structure["basis_sharing"]["partition"]
        print("basis sharing: " + ", ".join(f"{k.split('.')[-1]} {sum(len(r) > 1 for r in v)} shared groups"
                                            for k, v in groups.items()) + f"; {r.share_ratio:.0%} of the parameters kept",
              file=sys.stderr)
    if budget is not None:
        from llmpress.budget import check_budget, menu_configs, DEFAULT_MENU
        menu = menu_configs(r.menu or DEFAULT_MENU[budget.metric])
        check_budget(model, menu, budget)              # before reading any calibration text
        if r.target != "llmpress":
            from llmpress.targets import check_menu
            linears = adapter_for(model).linear_names(model)
            check_menu(r.target, menu, set(_shapes(model, linears).values()))
        allocated = _allocate(r, model, tokenizer, calibration(), budget, menu, device, source)
        plan, allocation = allocated.plan, allocated.info
    layer_configs = plan.resolve(adapter_for(model).linear_names(model))
    if job.command == "plan":
        return _report_plan(r, model, plan, layer_configs, allocated)
    if r.recover is not None and not any(c.family == "composite" for c in layer_configs.values()):
        raise LLMPressError("--recover fine-tunes low-rank adapters: give a method that has them (apiq, gptq-lr, oats)")
    from llmpress.distributed import world
    if r.recover is not None and (r.recover < 1 or world()[1] > 1 or source is not None):
        raise LLMPressError("--recover takes a positive step count, one process and a model held in memory")
    routed_low_rank = any(c is not None and c.method == "parse" for c in layer_configs.values())
    if routed_low_rank and (world()[1] > 1 or source is not None):
        raise LLMPressError("parse trains its routers on the whole compressed model: one process, the model in memory")
    substituted = {}
    if r.gguf_fallback:
        from llmpress.plan import with_gguf_fallback
        shapes = _shapes(model, layer_configs)
        layer_configs, substituted = with_gguf_fallback(layer_configs, shapes, r.gguf_fallback)
        for pair in sorted({(v["from"], v["to"]) for v in substituted.values()}):
            n = sum((v["from"], v["to"]) == pair for v in substituted.values())
            print(f"{n} layer(s) take {pair[1]} instead of {pair[0]} (rows not whole 256-weight blocks)", file=sys.stderr)
    _check_target(r, model, layer_configs)
    if any(c.stat for c in layer_configs.values()) or tokens is not None:    # calibrated, or pruned on it
        calibration()
        calib = {"source": r.calib, "num_samples": r.num_samples, "seq_len": r.seq_len, "seed": r.seed}
    one_pass = r.one_pass or r.stats_cache is not None
    from llmpress.distributed import world
    rank, n_ranks = world()
    checkpoint = None
    if r.stats_cache is None and n_ranks == 1:
        from llmpress.checkpoint import Checkpoint, run_key
        out = Path(job.out)
        folder = scratch or out.parent / f".{out.name}.partial"      # the offload folder doubles as it
        settings = {"layers": {k: v.to_dict() for k, v in layer_configs.items()}, "calibration": calib,
                    "propagate": not one_pass, "dtype": str(model.dtype), "batch_size": 8,
                    "sequential": r.sequential, "reference": r.reference, "tune": r.tune,
                    "calibrate_all_experts": r.calibrate_all_experts, "min_expert_tokens": r.min_expert_tokens,
                    "router_weighted_stats": r.router_weighted_stats}
        checkpoint = Checkpoint(folder, settings, run_key(model, tokens, source), resume=job.resume)
        if checkpoint.done:
            print(f"resuming from {folder}: {checkpoint.done} blocks already compressed", file=sys.stderr)
    elif job.resume:
        raise LLMPressError("--resume does not apply to a --stats-cache run")
    report = compress(model, layer_configs, tokens, propagate=not one_pass, stats_cache=r.stats_cache,
                      device=device, source=source, checkpoint=checkpoint, progress=rank == 0,
                      sequential=r.sequential, reference=r.reference, tune=r.tune,
                      calibrate_all_experts=r.calibrate_all_experts, min_expert_tokens=r.min_expert_tokens,
                      router_weighted=r.router_weighted_stats)
    if rank != 0:                                   # rank 0 writes the output
        return {"rank": rank, "compress_seconds": report.seconds, "reduced_bytes": report.reduced_bytes}
    recovery = None
    if r.recover:
        from llmpress.recover import train_adapters
        recovery = train_adapters(model, tokens.to(device), r.recover, lr=r.recover_lr, batch_size=r.recover_batch)
        print(f"recover: held-out calibration loss {recovery['heldout_loss_before']:.4f} -> "
              f"{recovery['heldout_loss_after']:.4f}" + ("" if recovery["kept"] else " (not lower: adapters put back)"),
              file=sys.stderr)
    routers = None
    if routed_low_rank:
        from llmpress.methods.parse import fit_routers       # PARSE's routers: trained on the compressed model
        routers = fit_routers(model, tokens, device=device)
    if calib:
        calib.update(propagate=not one_pass, sequential=r.sequential, reference=r.reference, tune=r.tune)
        if r.calibrate_all_experts:
            calib["calibrate_all_experts"] = True
        if r.router_weighted_stats:
            calib["router_weighted_stats"] = True
    routed = {k: v for k, v in report.layers.items() if "tokens" in v and k.endswith("gate_proj")}
    if routed:
        empty = sum(v["tokens"] == 0 for v in routed.values())
        few = sum("expert_fallback" in v for v in routed.values()) - empty
        print(f"{len(routed)} experts: {empty} got no calibration token (data-free solution), {few} fewer than "
              f"{r.min_expert_tokens} (damping raised); tokens per expert in the manifest's report", file=sys.stderr)
    fallbacks = {k: v for k, v in report.layers.items() if "fallback" in v}
    for fqn, info in fallbacks.items():
        print(f"warning: {fqn}: fell back to {info['fallback']} ({info['reason']})", file=sys.stderr)
    size = model_size(model)
    manifest = {"source_model": job.model, "device": str(device), "rotation": rotation,
                "plan": plan.to_dict(), "allocation": allocation,
                "layers": {k: v.to_dict() for k, v in layer_configs.items()},
                "calibration": calib, "seed": r.seed, "report": report.layers, "size": size,
                "gguf_fallbacks": substituted, "expert_pruning": experts, "structural_pruning": structure or None,
                "recovery": recovery, "parse_routers": routers, "recipe": r.to_dict()}
    out = save_compressed(model, tokenizer, job.out, manifest, overwrite=job.overwrite)
    exported = None
    if r.target != "llmpress":
        from llmpress.targets import EXPORT
        fmt, name = EXPORT[r.target]
        exported = str(out / name)
        print(f"--target {r.target}: writing {exported} ({fmt})", file=sys.stderr)
        from llmpress.formats import export_folder
        export_folder(out, fmt, out / name)
    if checkpoint is not None:
        checkpoint.remove()                           # saved: the per-block checkpoint is no longer needed
    result = {"out": str(out), "compress_seconds": report.seconds, **size, "calibration": calib, "recovery": recovery,
              "fallbacks": fallbacks, "gguf_fallbacks": substituted, "allocation": allocation, "processes": n_ranks,
              "reduced_bytes": report.reduced_bytes, "target": r.target, "export": exported}
    if allocation is not None:
        from llmpress.report import plot_allocation
        plot_allocation(allocated.table, allocated.choice, out / "allocation.png",
                        f"{allocation['allocator']} allocation at {allocation['budget']}")
    print(f"compressed {len(layer_configs)} layers in {report.seconds:.1f}s: {size['bytes']:,} bytes, "
          f"{size['bits_per_weight']:.3f} bits/weight -> {out}")
    return result


def _report_plan(r: Recipe, model, plan, layer_configs, allocated) -> dict:
    """`llmpress plan`: the allocation, its size and predicted loss; the Plan written if asked."""
    _check_target(r, model, layer_configs)
    info = allocated.info
    counts: dict[str, int] = {}
    for c in layer_configs.values():
        key = c.label() if c is not None else "dense"
        counts[key] = counts.get(key, 0) + 1
    print(f"plan for --budget {r.budget} --target {r.target}: {info['bytes']:,} bytes in the block linears, "
          f"{info['bits_per_weight']:.3f} bits/weight, {info['params_kept']:.3f} of their parameters kept, "
          f"predicted loss increase {info['predicted_error']:.4f} nats/token")
    for label, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d} x {label}")
    result = {"allocation": info, "plan": plan.to_dict(), "layers": {k: v.to_dict() if v else None for k, v in layer_configs.items()},
              "recipe": r.to_dict()}
    return result


def _allocate(r: Recipe, model, tokenizer, tokens, budget, menu, device, source):
    """The sensitivity table (cached) and the allocation, through llmpress.budget.plan_for_budget."""
    from llmpress.budget import plan_for_budget
    held_out = None
    if r.allocator in ("search", "refine"):
        from llmpress.data import calibration_tokens
        # the same seeded permutation, 4 windows further: disjoint from the calibration windows
        held_out = calibration_tokens(tokenizer, r.calib, r.num_samples + 4, r.seq_len, r.seed)[-4:]
    fuse = r.fuse
    if r.target == "llama.cpp":
        from llmpress.allocate import fused_groups
        if fused_groups(model, "llama.cpp"):             # a MoE: each projection's experts on one GGUF type
            if r.allocator in ("search", "refine"):
                raise LLMPressError("--target llama.cpp on a mixture of experts: each projection's experts share "
                                    "one type, which the knapsack and lagrange allocators support (not search / refine)")
            fuse = True
    result = plan_for_budget(model, tokens, budget, menu, r.allocator, held_out=held_out, fuse=fuse, target=r.target,
                             sample_windows=r.sample_windows, table_path=r.sensitivity, search_steps=r.search_steps,
                             refine_rounds=r.refine_rounds, device=device, source=source,
                             estimate=r.estimate_sensitivity)
    info = result.info
    print(f"allocation ({r.allocator}) ready in {info['allocate_seconds']:.2f}s: {info['params_kept']:.3f} of params "
          f"kept, {info['bits_per_weight']:.3f} bits/weight, {100 * info['use_of_budget']:.1f}% of the budget, "
          f"methods {info['methods']}")
    return result
