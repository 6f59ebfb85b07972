"""Allocators that measure the assembled model in context, starting from the knapsack choice.

- search: evolutionary refinement validated end to end (in the spirit of EvoPress, Sieberling et
  al. 2024): move budget between two layers and keep the move when the compressed model's loss on
  held-out calibration windows falls.
- refine: the knapsack re-solved on the exact KL to the dense model measured for every layer's
  neighbouring options (a trust-region step on in-context costs).
Both build each option's module once from the dense model's one-pass statistics (llmpress.walk).
"""
from __future__ import annotations

import numpy as np
import torch

from llmpress.allocate import _arrays, knapsack, knapsack_among
from llmpress.budget import Budget, Table
from llmpress.errors import LLMPressError
from llmpress.walk import BlockWalk, dense_statistics


class _Assembly:
    """A working copy of the model whose compressible linears can be switched between table
    options; each option's module is built once from the dense model's one-pass statistics."""

    def __init__(self, table: Table, model, stats_tokens):
        import copy
        self.table = table
        self.dense = {n: model.get_submodule(n) for n in table.layers}
        self.stats = dense_statistics(model, stats_tokens)
        self.work = copy.deepcopy(model)
        self.built: dict[tuple[str, int], torch.nn.Module] = {}

    def module(self, name: str, oi: int):
        from llmpress.config import handler_for
        from llmpress.modules import with_dense_cache
        if (name, oi) not in self.built:
            config = self.table.config(name, oi)
            self.built[name, oi] = (self.dense[name] if config is None else
                                    with_dense_cache(handler_for(config)(self.dense[name], config, self.stats[name])[0]))
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
    one: the inputs of every block under the current choice are cached (one walk records them)."""

    def __init__(self, asm: _Assembly, dense_model, windows: torch.Tensor):
        self.asm, self.windows = asm, windows
        dense = BlockWalk(dense_model, progress=False)
        self.dense_logp = torch.log_softmax(dense.head_logits(dense.forward_from(dense.capture(windows))), -1)  # (S, T, V)
        self.walk = BlockWalk(asm.work, progress=False)
        self.start = self.walk.capture(windows)                              # (S, T, C) into block 0
        self.inputs: list[torch.Tensor] = []                                 # [block] (S, T, C)
        self.last: list[float] = []            # per-window KL of the last measurement

    def _kl(self, final: torch.Tensor) -> float:
        """Mean per-token KL over the windows (equal lengths); per window kept in `last`."""
        logq = torch.log_softmax(self.walk.head_logits(final), -1)
        logp = self.dense_logp
        self.last = ((logp.exp() * (logp - logq)).sum(-1).mean(-1)).tolist()
        return sum(self.last) / len(self.last)

    def refresh(self) -> float:
        """Cache every block's inputs under the current choice; returns its KL."""
        self.inputs = []
        return self._kl(self.walk.forward_from(self.start, 0, record=self.inputs))

    def kl_from(self, block: int) -> float:
        """The KL with blocks 0..block-1 not re-run: block `block` reads the input it had under the
        current choice (so only a change in block `block` or later is seen)."""
        return self._kl(self.walk.forward_from(self.inputs[block], block))


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
