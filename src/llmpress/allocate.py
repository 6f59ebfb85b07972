"""Allocators: (sensitivity table, budget) -> a choice of option per layer -> a Plan.

- knapsack: multiple-choice knapsack, exact dynamic programme over each layer's cost above its
  cheapest option, rounded up to 1/50000 of the budget left above the cheapest choice (so the
  result never exceeds the budget; optimal among choices whose rounded cost fits).
- lagrange: minimise sum(error) + lambda * sum(cost) per layer, lambda bisected to the budget
  (as in D-Rank), then spare budget filled greedily by error saved per unit of cost.
Table math only; the allocators that measure the model in context (`search`, `refine`) are in
llmpress.search, the OWL and effective-rank baselines in llmpress.baselines.
"""
from __future__ import annotations

import math
import time

import numpy as np
from llmpress.budget import Budget, Table
from llmpress.errors import LLMPressError
from llmpress.plan import Plan

DP_UNITS = 50000


def _arrays(table: Table, budget: Budget):
    names = list(table.layers)
    costs = [np.array([budget.cost(o) for o in table.layers[n]["options"]], dtype=np.float64) for n in names]
    errors = [np.array([o["error"] for o in table.layers[n]["options"]], dtype=np.float64) for n in names]
    return names, costs, errors


def _check_feasible(costs, limit) -> None:
    cheapest = sum(c.min() for c in costs)
    if cheapest > limit:
        raise LLMPressError(f"the budget is below what the menu can reach: cheapest choice costs "
                            f"{cheapest:,.0f}, budget {limit:,.0f}; add cheaper options to the menu")


def knapsack(table: Table, budget: Budget) -> dict[str, int]:
    names, costs, errors = _arrays(table, budget)
    limit = budget.limit(table)
    _check_feasible(costs, limit)
    # the DP runs over each layer's cost above its cheapest option, so that a budget at exactly
    # the cheapest choice (which rounding every cost up would push out of reach) stays reachable
    floor_cost = [c.min() for c in costs]
    slack = limit - sum(floor_cost)
    if slack <= 0:                          # only the cheapest options fit: the least error among them
        return {n: int(np.flatnonzero(c == c.min())[np.argmin(e[c == c.min()])])
                for n, c, e in zip(names, costs, errors)}
    costs = [c - m for c, m in zip(costs, floor_cost)]
    unit = slack / DP_UNITS
    inf = np.inf
    best = np.full(DP_UNITS + 1, inf)
    best[0] = 0.0                                         # best[k]: least error using exactly k units
    choice = np.zeros((len(names), DP_UNITS + 1), dtype=np.int16)
    for li, (c, e) in enumerate(zip(costs, errors)):
        units = np.ceil(c / unit - 1e-9).astype(np.int64)
        new = np.full(DP_UNITS + 1, inf)
        pick = np.zeros(DP_UNITS + 1, dtype=np.int16)
        for oi, (u, err) in enumerate(zip(units, e)):
            if u > DP_UNITS:
                continue
            cand = np.full(DP_UNITS + 1, inf)
            cand[u:] = best[:DP_UNITS + 1 - u] + err
            better = cand < new
            new[better], pick[better] = cand[better], oi
        best, choice[li] = new, pick
    # land within 1 % of the budget when some choice can (rounded costs overestimate, so the
    # window is checked again on the true costs by `summarize`); else the least error below it
    floor = min(DP_UNITS, max(0, int((0.99 * limit - sum(floor_cost)) / unit)))
    k = floor + int(np.argmin(best[floor:]))
    if not np.isfinite(best[k]):
        k = int(np.argmin(best))
    if not np.isfinite(best[k]):
        raise LLMPressError("no allocation fits the budget")
    out = {}
    for li in range(len(names) - 1, -1, -1):          # walk the choices back
        oi = int(choice[li, k])
        out[names[li]] = oi
        k -= int(np.ceil(costs[li][oi] / unit - 1e-9))
    return out


def knapsack_among(table: Table, budget: Budget, errors: dict[str, dict[int, float]]) -> dict[str, int]:
    """The knapsack over a subset of each layer's options, with errors of the caller's: errors maps
    layer -> {option index: error}; the choice is returned as indices into the full table."""
    layers = {n: {**table.layers[n], "options": [{**table.layers[n]["options"][i], "error": e}
                                                 for i, e in sorted(errors[n].items())]}
              for n in table.layers}
    solved = knapsack(Table(layers, table.meta), budget)
    return {n: sorted(errors[n])[k] for n, k in solved.items()}


def lagrange(table: Table, budget: Budget) -> dict[str, int]:
    names, costs, errors = _arrays(table, budget)
    limit = budget.limit(table)
    _check_feasible(costs, limit)

    def pick(lam):
        return [int(np.argmin(e + lam * c)) for c, e in zip(costs, errors)]

    def total(ch):
        return sum(c[i] for c, i in zip(costs, ch))
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > limit:
        hi *= 10
        if hi > 1e30:
            raise LLMPressError("lagrange: no multiplier meets the budget")
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if total(pick(mid)) > limit:
            lo = mid
        else:
            hi = mid
    ch = pick(hi)
    # spend what is left: repeatedly take the upgrade with the most error saved per unit of cost
    spare = limit - total(ch)
    while True:
        best = None
        for li, (c, e) in enumerate(zip(costs, errors)):
            for oi in range(len(c)):
                dc, de = c[oi] - c[ch[li]], e[ch[li]] - e[oi]
                if 0 < dc <= spare and de > 0 and (best is None or de / dc > best[0]):
                    best = (de / dc, li, oi, dc)
        if best is None:
            break
        _, li, oi, dc = best
        ch[li], spare = oi, spare - dc
    return dict(zip(names, ch))


def uniform(table: Table, label: str) -> dict[str, int]:
    out = {}
    for name, layer in table.layers.items():
        idx = [i for i, o in enumerate(layer["options"]) if o["label"] == label]
        if not idx:
            raise LLMPressError(f"option {label!r} is not on the menu of {name}")
        out[name] = idx[0]
    return out


def nearest(table: Table, name: str, family_method: str, key: str, value: float) -> int:
    """Index of the option of `family_method` whose `key` is closest to value."""
    opts = [(i, o) for i, o in enumerate(table.layers[name]["options"])
            if o["config"] and o["config"]["method"] == family_method]
    if not opts:
        raise LLMPressError(f"{family_method} is not on the menu")
    return min(opts, key=lambda io: abs(io[1]["config"][key] - value))[0]


def summarize(table: Table, choice: dict[str, int], budget: Budget) -> dict:
    opts = [table.layers[n]["options"][i] for n, i in choice.items()]
    params = sum(table.layers[n]["params"] for n in choice)
    nbytes = sum(o["bytes"] for o in opts)
    return {"params_kept": sum(o["params"] for o in opts) / params, "bytes": nbytes,
            "bits_per_weight": 8 * nbytes / params, "predicted_error": sum(o["error"] for o in opts),
            "budget": f"{budget.metric}={budget.target:g}",
            "use_of_budget": sum(budget.cost(o) for o in opts) / budget.limit(table),
            "methods": sorted({o["label"].split(":")[0] for o in opts})}


def to_plan(table: Table, choice: dict[str, int]) -> Plan:
    return Plan([(name, table.config(name, i)) for name, i in choice.items()])


def fused_groups(model, target: str = "vllm") -> list[list[str]]:
    """Layers that must share one choice on `target` (llmpress.targets.fused_sets), as lists of
    module names: for vLLM q/k/v and gate/up of a block and every expert projection of one MoE
    layer; for llama.cpp each projection of a layer's experts (one GGUF tensor)."""
    from llmpress.arch import adapter_for
    from llmpress.targets import fused_sets
    return fused_sets(adapter_for(model).linear_names(model), target)


def fuse(table: Table, groups: list[list[str]]) -> Table:
    """The table with each group as one item: option k of the item is option k on every member
    (same menu on every layer), its bytes, params and error summed."""
    layers = {}
    for members in groups:
        missing = [m for m in members if m not in table.layers]
        if missing:
            raise LLMPressError(f"fused group names layers that are not in the table: {missing}")
        labels = [o["label"] for o in table.layers[members[0]]["options"]]
        if any([o["label"] for o in table.layers[m]["options"]] != labels for m in members):
            raise LLMPressError(f"the layers of {members} do not share one menu; they cannot be fused")
        options = []
        for k, label in enumerate(labels):
            opts = [table.layers[m]["options"][k] for m in members]
            options.append({**opts[0], **{f: sum(o[f] for o in opts) for f in ("bytes", "params", "error", "error_diag")
                                          if f in opts[0]}})
        layers["+".join(members)] = {"in": table.layers[members[0]]["in"], "members": members, "options": options,
                                     "out": sum(table.layers[m]["out"] for m in members),
                                     "params": sum(table.layers[m]["params"] for m in members)}
    covered = {m for g in groups for m in g}
    for name, layer in table.layers.items():
        if name not in covered:
            layers[name] = layer
    return Table(layers, {**table.meta, "fused": True})


def allocate(table: Table, budget: Budget, allocator: str = "knapsack", fuse_groups: list[list[str]] | None = None,
             **search_kwargs) -> tuple[dict[str, int], dict]:
    """(table, budget) -> (choice: layer -> option index, summary). With fuse_groups, the layers of
    each group get one shared choice."""
    t = time.perf_counter()
    solvers = {"knapsack": knapsack, "lagrange": lagrange}
    if allocator in ("search", "refine"):
        from llmpress.search import evolutionary_search, refine
        searches = {"search": evolutionary_search, "refine": refine}
        if fuse_groups:
            raise LLMPressError(f"fused groups are supported by the knapsack and lagrange allocators, not by {allocator}")
        choice = searches[allocator](table, budget, **search_kwargs)
    elif allocator not in solvers:
        raise LLMPressError(f"unknown allocator {allocator!r}; use knapsack, lagrange, search or refine")
    elif fuse_groups:
        fused = fuse(table, fuse_groups)
        solved = solvers[allocator](fused, budget)
        members = {m: i for key, i in solved.items() for m in fused.layers[key].get("members", [key])}
        choice = {n: members[n] for n in table.layers}          # model order
    else:
        choice = solvers[allocator](table, budget)
    info = {"allocator": allocator, "allocate_seconds": time.perf_counter() - t, "fused": bool(fuse_groups),
            **summarize(table, choice, budget)}
    return choice, info
