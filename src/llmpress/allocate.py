"""Allocators: (sensitivity table, budget) -> a choice of option per layer -> a Plan.

- knapsack: multiple-choice knapsack, exact dynamic programme over costs rounded up to 1/50000 of
  the budget (so the result never exceeds it; optimal among choices whose rounded cost fits).
- lagrange: minimise sum(error) + lambda * sum(cost) per layer, lambda bisected to the budget
  (as in D-Rank), then spare budget filled greedily by error saved per unit of cost.
- search: evolutionary refinement validated end to end (in the spirit of EvoPress): starting from
  the knapsack choice, move budget between two layers and keep the move when the compressed
  model's loss on held-out calibration windows falls.
Baselines: uniform, OWL (outlier-weighted layer-wise sparsity) and effective-rank ranks.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

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
    unit = limit / DP_UNITS
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
    floor = int(0.99 * DP_UNITS)
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


def fused_groups(model) -> list[list[str]]:
    """Layers that serving engines fuse into one matmul (they read the same input: q/k/v, gate/up),
    as lists of module names; o_proj and down_proj stand alone."""
    from llmpress.arch import adapter_for
    adapter = adapter_for(model)
    return [[f"{adapter.blocks_path}.{i}.{local}" for local in group]
            for i in range(len(adapter.blocks(model))) for group in adapter.input_groups]


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
    searches = {"search": evolutionary_search, "refine": refine}
    if allocator in searches:
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


class _Assembly:
    """A working copy of the model whose compressible linears can be switched between table
    options; each option's module is built once from the dense model's one-pass statistics."""

    def __init__(self, table: Table, model, stats_tokens):
        import copy
        self.table = table
        self.dense = {n: model.get_submodule(n) for n in table.layers}
        self.stats = _dense_stats(model, stats_tokens)
        self.work = copy.deepcopy(model)
        self.built: dict[tuple[str, int], torch.nn.Module] = {}

    def module(self, name: str, oi: int):
        from llmpress.config import handler_for
        if (name, oi) not in self.built:
            config = self.table.config(name, oi)
            self.built[name, oi] = (self.dense[name] if config is None else
                                    handler_for(config)(self.dense[name], config, self.stats[name])[0])
        return self.built[name, oi]

    def set(self, name: str, oi: int) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(self.work.get_submodule(parent), attr, self.module(name, oi))

    def forget(self, keep: dict[str, int]) -> None:
        """Drop built modules other than the chosen ones (memory)."""
        self.built = {k: v for k, v in self.built.items() if keep.get(k[0]) == k[1]}


@torch.no_grad()
def evolutionary_search(table: Table, budget: Budget, model=None, stats_tokens=None, eval_tokens=None,
                        steps: int = 40, seed: int = 0, progress: bool = True) -> dict[str, int]:
    """(1+1) evolution from the knapsack choice. Each step moves one layer to a cheaper option and
    another to a dearer one within the budget, builds just those two layers (one-pass statistics of
    the dense model), and keeps the move if the loss on `eval_tokens` (held-out calibration windows,
    never evaluation text) falls."""
    from tqdm.auto import tqdm

    if model is None or stats_tokens is None or eval_tokens is None:
        raise LLMPressError("the search allocator needs the model and calibration tokens")
    names, costs, errors = _arrays(table, budget)
    limit = budget.limit(table)
    choice = knapsack(table, budget)
    current = [choice[n] for n in names]
    asm = _Assembly(table, model, stats_tokens)

    def loss(m) -> float:
        return sum(m(w[None], labels=w[None], use_cache=False).loss.item() for w in eval_tokens) / len(eval_tokens)

    for k in range(len(names)):
        asm.set(names[k], current[k])
    best = loss(asm.work)
    rng = np.random.default_rng(seed)
    total = sum(c[i] for c, i in zip(costs, current))
    for _ in tqdm(range(steps), desc="search", disable=not progress):
        a, b = rng.choice(len(names), 2, replace=False)
        cheaper = [i for i in range(len(costs[a])) if costs[a][i] < costs[a][current[a]]]
        dearer = [i for i in range(len(costs[b])) if costs[b][i] > costs[b][current[b]]]
        if not cheaper or not dearer:
            continue
        na = max(cheaper, key=lambda i: costs[a][i])          # one level down
        nb = min(dearer, key=lambda i: costs[b][i])           # one level up
        new_total = total - costs[a][current[a]] + costs[a][na] - costs[b][current[b]] + costs[b][nb]
        if new_total > limit:
            continue
        old = (current[a], current[b])
        asm.set(names[a], na)
        asm.set(names[b], nb)
        value = loss(asm.work)
        if value < best:
            best, total = value, new_total
            current[a], current[b] = na, nb
        else:
            asm.set(names[a], old[0])
            asm.set(names[b], old[1])
        asm.forget(dict(zip(names, current)))
    return dict(zip(names, current))


def neighbours(table: Table, name: str, oi: int) -> list[int]:
    """The options next to option `oi` of a layer: of the same method, the next cheaper and the next
    dearer by parameters then bytes; dense counts as the dearest level of every method."""
    opts = table.layers[name]["options"]
    method = (opts[oi]["config"] or {}).get("method")
    if method is None:                                    # dense: the dearest level of each method
        return [max((i for i, o in enumerate(opts) if o["config"] and o["config"]["method"] == m),
                    key=lambda i: (opts[i]["params"], opts[i]["bytes"]))
                for m in sorted({o["config"]["method"] for o in opts if o["config"]})]
    same = sorted((i for i, o in enumerate(opts) if o["config"] is None or o["config"]["method"] == method),
                  key=lambda i: (opts[i]["params"], opts[i]["bytes"]))
    k = same.index(oi)
    return [same[j] for j in (k - 1, k + 1) if 0 <= j < len(same)]


class _Tail:
    """KL(dense || work model) on fixed windows, re-running only the blocks from the first changed
    one: the inputs of every block under the current choice are cached."""

    def __init__(self, asm: _Assembly, dense_model, windows: torch.Tensor):
        from llmpress.arch import adapter_for
        self.asm, self.windows = asm, windows
        self.blocks = adapter_for(asm.work).blocks(asm.work)
        self.dense_logp = [torch.log_softmax(dense_model(w[None], use_cache=False).logits[0].float(), -1)
                           for w in windows]                                    # each (T, V)
        self.inputs: list[list[torch.Tensor]] = []                            # [block][window] (1, T, C)
        self.as_tuple = False                  # some transformers versions return (hidden, ...) from a block
        self.last: list[float] = []            # per-window KL of the last measurement

    def _kl(self) -> float:
        """Mean per-token KL over the windows (equal lengths); per window kept in `last`."""
        self.last = []
        for w, logp in zip(self.windows, self.dense_logp):
            logq = torch.log_softmax(self.asm.work(w[None], use_cache=False).logits[0].float(), -1)
            self.last.append((logp.exp() * (logp - logq)).sum().item() / logp.shape[0])
        return sum(self.last) / len(self.last)

    def refresh(self) -> float:
        """Cache every block's inputs under the current choice; returns its KL."""
        self.inputs = [[] for _ in self.blocks]

        def capture(i):
            def pre(module, args, kwargs):
                self.inputs[i].append((args[0] if args else kwargs["hidden_states"]).detach())
            return pre
        handles = [b.register_forward_pre_hook(capture(i), with_kwargs=True) for i, b in enumerate(self.blocks)]

        def output_type(module, args, output):
            self.as_tuple = isinstance(output, tuple)
        handles.append(self.blocks[0].register_forward_hook(output_type))
        try:
            return self._kl()
        finally:
            for h in handles:
                h.remove()

    def kl_from(self, block: int) -> float:
        """The KL with blocks 0..block-1 skipped: block `block` reads the input it had under the
        current choice (so only a change in block `block` or later is seen)."""
        saved = [self.blocks[j] for j in range(block)]
        for j in range(block):
            self.blocks[j] = _Skip(saved[j], self.as_tuple)
        window = iter(range(len(self.windows)))

        def replace(module, args, kwargs):
            cached = self.inputs[block][next(window)]
            return ((cached, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": cached})
        handle = self.blocks[block].register_forward_pre_hook(replace, with_kwargs=True)
        try:
            return self._kl()
        finally:
            handle.remove()
            for j in range(block):
                self.blocks[j] = saved[j]


class _Skip(torch.nn.Module):
    """Stands in for a decoder block that is not re-run: passes the hidden states through (the next
    block's pre-hook replaces them anyway) and keeps the attributes the model's loop reads."""

    def __init__(self, block, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


@torch.no_grad()
def refine(table: Table, budget: Budget, model=None, stats_tokens=None, eval_tokens=None, rounds: int = 1,
           progress: bool = True, record: list | None = None) -> dict[str, int]:
    """The knapsack choice, refined in context. The table's errors are measured one layer at a time
    around the dense model and summed; once every layer is compressed they interact. Each round
    assembles the current choice (layers built from the dense model's one-pass statistics), then
    measures exactly, for every layer and each of its neighbouring options (one level cheaper, one
    dearer), the KL(dense || model) on `eval_tokens` (held-out calibration windows, never evaluation
    text) with only that layer switched, and solves the knapsack again over {current, neighbours}
    with these KLs as the errors: a trust-region step on the measured, in-context costs. Blocks
    before the switched layer are not re-run (their outputs are cached). A round whose new choice
    measures worse than the current one is undone and the refinement stops. `record`, a list, gets
    one entry per round: the choice it started from and every measured KL per window."""
    from tqdm.auto import tqdm
    from llmpress.arch import adapter_for

    if model is None or stats_tokens is None or eval_tokens is None:
        raise LLMPressError("the refine allocator needs the model and calibration tokens")
    if rounds < 1:
        raise LLMPressError(f"refine needs at least one round; got {rounds}")
    names = list(table.layers)
    choice = knapsack(table, budget)
    asm = _Assembly(table, model, stats_tokens)
    for n in names:
        asm.set(n, choice[n])
    tail = _Tail(asm, model, eval_tokens)
    adapter = adapter_for(model)
    block_of = {n: adapter.block_index(n) for n in names}
    base = tail.refresh()
    base_windows = tail.last
    for r in range(rounds):
        errors: dict[str, dict[int, float]] = {}
        measurements: dict[str, dict] = {}
        if record is not None:
            record.append({"start": dict(choice), "kl_per_window": measurements})
        bar = tqdm(names, desc=f"refine round {r + 1}", unit="layer", disable=not progress)
        for n in bar:
            measured = {choice[n]: base}
            windows = {choice[n]: base_windows}
            for oi in neighbours(table, n, choice[n]):
                asm.set(n, oi)
                measured[oi] = tail.kl_from(block_of[n])
                windows[oi] = tail.last
            asm.set(n, choice[n])
            asm.forget(choice)
            errors[n] = measured
            bar.set_postfix(kl=f"{base:.4f}")
            if record is not None:
                measurements[n] = {str(i): w for i, w in windows.items()}
        proposal = knapsack_among(table, budget, errors)
        for n in names:
            asm.set(n, proposal[n])
        value = tail.refresh()
        print(f"refine round {r + 1}: KL {base:.5g} -> {value:.5g} nats/token "
              f"(predicted {base + sum(errors[n][i] - base for n, i in proposal.items()):.5g}), "
              f"{sum(proposal[n] != choice[n] for n in names)} layers moved")
        if value >= base:
            for n in names:
                asm.set(n, choice[n])
            break
        choice, base, base_windows = proposal, value, tail.last
        asm.forget(choice)
    return choice


def _dense_stats(model, tokens) -> dict:
    from llmpress.arch import adapter_for
    from llmpress.pipeline import _collect_block_stats, capture_block_inputs
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks, tokens, 8)
    out = {}
    for i, block in enumerate(blocks):
        hidden, stats = _collect_block_stats(block, adapter, adapter.blocks_path, i, {}, hidden, kwargs, 8, all_groups=True)
        out.update({f"{adapter.blocks_path}.{i}.{k}": v for k, v in stats.items()})
    return out


def owl_block_sparsity(model, stats_by_layer: dict, sparsity: float, m: float = 5.0, lamda: float = 0.08) -> list[float]:
    """OWL: Yin et al. 2023, "Outlier Weighed Layerwise Sparsity (OWL)" (arXiv:2310.05175). Per block,
    the outlier ratio D = share of Wanda scores |W_ij| ||X_j|| above m x their mean; blocks with more
    outliers keep more weights: density_i = (1 - S) + lamda-scaled (D_i - mean D) in [-lamda, lamda]."""
    from llmpress.arch import adapter_for
    adapter = adapter_for(model)
    prefix = adapter.blocks_path
    ratios = []
    for i in range(len(adapter.blocks(model))):
        scores = []
        for group in adapter.input_groups:
            for local in group:
                name = f"{prefix}.{i}.{local}"
                w = model.get_submodule(name).weight.detach().float()
                scores.append((w.abs() * stats_by_layer[name].col_norms()[None, :]).flatten())
        s = torch.cat(scores)
        ratios.append((s > m * s.mean()).float().mean().item())
    r = np.array(ratios)
    r = (r - r.min()) / max(r.max() - r.min(), 1e-12) * lamda * 2
    density = r - r.mean() + (1 - sparsity)
    return [float(1 - d) for d in density]


def effective_rank_ratios(model, stats_by_layer: dict, param_fraction: float) -> dict[str, float]:
    """Effective-rank allocation (as in D-Rank, Mi et al. 2025): rank_l proportional to the effective
    rank exp(H(p)), p = s / sum(s), of the layer's whitened spectrum (singular values of W L,
    L L^T = X^T X), scaled so the factors keep `param_fraction` of the parameters."""
    from llmpress.arch import adapter_for
    names = adapter_for(model).linear_names(model)
    erank, shapes = {}, {}
    for name in names:
        w = model.get_submodule(name).weight.detach().double()
        g = stats_by_layer[name].gram_matrix().double()
        lower = torch.linalg.cholesky(g + 1e-6 * torch.diagonal(g).mean() * torch.eye(g.shape[0], dtype=g.dtype))
        s = torch.linalg.svdvals(w @ lower)
        p = s / s.sum()
        erank[name] = math.exp(-(p * torch.log(p.clamp(min=1e-30))).sum().item())
        shapes[name] = w.shape
    target = param_fraction * sum(o * i for o, i in shapes.values())
    # ranks r_l = c * erank_l, capped so that no layer keeps more than 95 % of its parameters
    lo, hi = 0.0, 1e4
    for _ in range(100):
        c = (lo + hi) / 2
        used = sum(min(c * erank[n], 0.95 * o * i / (o + i)) * (o + i) for n, (o, i) in shapes.items())
        lo, hi = (c, hi) if used < target else (lo, c)
    return {n: min(lo * erank[n] * (o + i) / (o * i), 0.95) for n, (o, i) in shapes.items()}


def plot_allocation(table: Table, choice: dict[str, int], path, title: str) -> None:
    """Per layer: the chosen option's kept parameters and bits per weight, coloured by family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from llmpress.report import FAMILY_COLOURS
    names = [n for n in table.layers if n in choice]      # model order (block 0 first)
    opts = [table.layers[n]["options"][choice[n]] for n in names]
    fam = [("dense" if o["config"] is None else _family(o["config"]["method"])) for o in opts]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True)
    x = np.arange(len(names))
    kept = [o["params"] / table.layers[n]["params"] for n, o in zip(names, opts)]
    bits = [8 * o["bytes"] / table.layers[n]["params"] for n, o in zip(names, opts)]
    for f in sorted(set(fam)):
        idx = [k for k in range(len(names)) if fam[k] == f]
        a1.bar(x[idx], [kept[k] for k in idx], color=FAMILY_COLOURS.get(f, "grey"), label=f, width=0.9)
        a2.bar(x[idx], [bits[k] for k in idx], color=FAMILY_COLOURS.get(f, "grey"), width=0.9)
    a1.set_ylabel("parameters kept (fraction)")
    a1.legend(fontsize=8, ncol=4)
    a2.set_ylabel("bits per weight (as stored)")
    ticks = [k for k, n in enumerate(names) if n.endswith("q_proj")]
    a2.set_xticks(ticks, [names[k].split(".")[2] for k in ticks], fontsize=7)
    a2.set_xlabel("decoder block (q, k, v, o, gate, up, down in each)")
    for a in (a1, a2):
        a.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _family(method: str) -> str:
    from llmpress.config import config_class
    return config_class(method).family
