"""One budget across layers and methods: costs counted as the export stores them, a sensitivity
table measured once per (model, calibration data) and menu option, saved as JSON.

The table lists, per compressible linear, a menu of options (dense, or a method config) with
  bytes   exactly as the compressed module stores them (see llmpress.modules),
  params  parameters kept (nonzeros, factor entries; all of them for quantization),
  error   the loss increase that option alone is estimated to cause, in nats per token: the change
          d_t it makes in its decoder block's output at token t on calibration tokens (dense block
          inputs), projected on g_t = d loss / d block output there (one backward pass):
          1/2 sum_t (g_t . d_t)^2 / tokens, the empirical Fisher's quadratic form per token.
          Block-local errors alone are not comparable across blocks: the residual stream's norm
          grows (and spikes in a few blocks) along the depth, so a plain relative error tells the
          allocator that the middle blocks are nearly free; the Fisher weight puts every block's
          error in the same unit, the loss.
  error_diag  the same with the Fisher's diagonal only, 1/2 sum_t sum_c g_tc^2 d_tc^2 / tokens: it
          drops how d lines up with g across channels, and allocates worse (bench/README.md).
  block_error  the plain relative error ||block(x) - block'(x)||^2 / ||block(x)||^2 (diagnostic).
Allocators (llmpress.allocate) turn (table, budget) into a Plan.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmpress.config import (MethodConfig, config_class, config_from_dict, handler_for, method_names,
                             parse_options)
from llmpress.errors import LLMPressError
from llmpress.walk import block_hidden

TABLE_VERSION = 4             # 4: linears of the block's tail measured on the tail alone (arch.Adapter.tail)
METRICS = ("params", "bits", "bytes")

DEFAULT_MENU = {"params": "sparsegpt,svd-llm", "bits": "gptq,sparsegpt,svd-llm", "bytes": "gptq,sparsegpt,svd-llm"}


@dataclass(frozen=True)
class Budget:
    metric: str      # params: fraction of parameters kept; bits: average bits per weight; bytes: total
    target: float

    @classmethod
    def parse(cls, spec: str) -> "Budget":
        metric, eq, value = spec.partition("=")
        try:
            target = float(value)
        except ValueError:
            target = -1.0
        if not eq or metric not in METRICS or target <= 0 or (metric == "params" and target > 1):
            raise LLMPressError(f"budget must be params=F (0 < F <= 1), bits=F or bytes=N; got {spec!r}")
        return cls(metric, target)

    def limit(self, table: "Table") -> float:
        """The budget in the unit of `cost` (params kept, or bytes)."""
        total_params = sum(layer["params"] for layer in table.layers.values())
        if self.metric == "params":
            return self.target * total_params
        if self.metric == "bits":
            return self.target * total_params / 8
        return self.target

    def cost(self, option: dict) -> float:
        return option["params"] if self.metric == "params" else option["bytes"]


def menu_configs(menu: str) -> list[MethodConfig]:
    """'gptq,sparsegpt' -> every level those methods put on a menu (each config class's `menu`).

    An entry may fix options of all its levels: 'gptq:group_size=0,clip=mse;gptq-lr;sparsegpt'
    (with options, entries are separated by ';'). The levels stay the method's own (bits 2/3/4/8
    for GPTQ); an option given here overrides the level's value. An entry fixing a GGUF grid
    ('gptq:gguf=q4_k') is that one option."""
    out = []
    entries = menu.split(";") if (";" in menu or ":" in menu) else menu.split(",")
    for entry in filter(None, (m.strip() for m in entries)):
        name, _, opts = entry.partition(":")
        name = name.strip()
        fixed = parse_options(opts, entry)
        levels = config_class(name).menu_levels()
        if fixed.get("gguf"):         # a GGUF grid fixes bits and group size: one option, not a level per bits
            levels = [config_class(name)()]
        if not levels:
            with_menu = [m for m in method_names() if config_class(m).menu]
            raise LLMPressError(f"{name!r} has no menu levels; menu methods: {', '.join(with_menu)}")
        for level in levels:
            cfg = config_from_dict({**level.to_dict(), **fixed})
            if cfg not in out:
                out.append(cfg)
    if not out:
        raise LLMPressError("the menu is empty")
    return out


def option_cost(config: MethodConfig | None, out_f: int, in_f: int, dense_bytes_per_param: int,
                bias: bool = False) -> tuple[int, int]:
    """(bytes as stored, parameters kept) of one layer under `config` (None: dense); bias: the layer
    has one (Qwen2's q/k/v), stored in the dense dtype, or fp16 beside a compressed weight."""
    if config is None:
        return out_f * (in_f + bias) * dense_bytes_per_param, out_f * in_f
    nbytes, params = config.storage(out_f, in_f)
    return nbytes + 2 * out_f * bias, params


def check_budget(model, menu: list[MethodConfig], budget: "Budget") -> None:
    """check_feasible on the model's compressible linears (shapes only: works on an offloaded skeleton)."""
    from llmpress.arch import adapter_for
    linears = [model.get_submodule(n) for n in adapter_for(model).linear_names(model)]
    check_feasible([(m.out_features, m.in_features) for m in linears], menu, budget,
                   linears[0].weight.element_size())


def check_feasible(shapes: list[tuple[int, int]], menu: list[MethodConfig], budget: "Budget",
                   dense_bytes_per_param: int) -> None:
    """Refuse, before any measurement, a budget below what the cheapest option on every layer
    reaches. shapes: (out, in) of every compressible linear."""
    params = sum(o * i for o, i in shapes)
    unit = {"params": params, "bits": params / 8}.get(budget.metric, 1)
    cheapest = 0.0
    for o, i in shapes:
        options = [option_cost(c, o, i, dense_bytes_per_param) for c in [None, *menu]
                   if c is None or c.shape_problem(o, i) is None]
        cheapest += min(p if budget.metric == "params" else b for b, p in options)
    if cheapest > budget.target * unit:
        raise LLMPressError(f"{budget.metric}={budget.target:g} is below what the menu can reach "
                            f"({budget.metric}={cheapest / unit:.4g} at its cheapest); raise the budget or "
                            f"add cheaper options to the menu")


@dataclass
class Table:
    layers: dict[str, dict]     # fqn -> {"out", "in", "params", "options": [{label, config, bytes, params, error}]}
    meta: dict

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": TABLE_VERSION, "meta": self.meta, "layers": self.layers}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Table":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LLMPressError(f"cannot read sensitivity table {path}: {e}")
        if d.get("version") != TABLE_VERSION:
            raise LLMPressError(f"{path}: sensitivity table version {d.get('version')} is not supported")
        return cls(d["layers"], d["meta"])

    def config(self, fqn: str, index: int) -> MethodConfig | None:
        c = self.layers[fqn]["options"][index]["config"]
        return None if c is None else config_from_dict(c)

    def restricted(self, methods: list[str]) -> "Table":
        """The same table with only `methods`' options (and dense) on each layer's menu: allocate
        along one axis (e.g. sparsity alone) without measuring again."""
        layers = {n: {**layer, "options": [o for o in layer["options"]
                                           if o["config"] is None or o["config"]["method"] in methods]}
                  for n, layer in self.layers.items()}
        if all(len(layer["options"]) == 1 for layer in layers.values()):
            raise LLMPressError(f"none of {methods} is on this table's menu")
        return Table(layers, {**self.meta, "restricted_to": list(methods)})

    def merged(self, other: "Table") -> "Table":
        """One menu from two tables measured on the same model and calibration windows with
        different menus (each option's row is measured alone, so rows combine): extend a menu
        without measuring the first part again. Refused when the layers, their shapes, the token
        shape or the number of windows differ; that both saw the same weights and tokens is the
        caller's to ensure (their keys differ by the menu)."""
        for field in ("tokens", "sample_windows", "dense_bytes_per_param"):
            if self.meta.get(field) != other.meta.get(field):
                raise LLMPressError(f"cannot merge sensitivity tables measured with different {field}: "
                                    f"{self.meta.get(field)} vs {other.meta.get(field)}")
        both = [json.dumps(c, sort_keys=True) for c in self.meta.get("menu", [])]
        if any(json.dumps(c, sort_keys=True) in both for c in other.meta.get("menu", [])):
            raise LLMPressError("cannot merge sensitivity tables whose menus share an option")
        if set(self.layers) != set(other.layers) or any(
                (layer["out"], layer["in"]) != (other.layers[n]["out"], other.layers[n]["in"]) for n, layer in self.layers.items()):
            raise LLMPressError("cannot merge sensitivity tables of different layers")
        layers = {n: {**layer, "options": layer["options"] + [o for o in other.layers[n]["options"] if o["config"] is not None]}
                  for n, layer in self.layers.items()}
        return Table(layers, {**self.meta, "menu": self.meta["menu"] + other.meta["menu"],
                              "seconds": self.meta.get("seconds", 0) + other.meta.get("seconds", 0),
                              "merged_from": [self.meta.get("key"), other.meta.get("key")]})

    def with_error(self, field: str) -> "Table":
        """The same table with another of its estimates (e.g. error_diag) as the `error` the
        allocators read: compare estimators without measuring again."""
        if any(field not in o for layer in self.layers.values() for o in layer["options"]):
            raise LLMPressError(f"this table has no {field!r} for every option")
        layers = {n: {**layer, "options": [{**o, "error": o[field]} for o in layer["options"]]}
                  for n, layer in self.layers.items()}
        return Table(layers, {**self.meta, "error_field": field})


def rows_key(model, tokens: torch.Tensor, sample_windows: int, source=None) -> str:
    """Identifies what every row of a table depends on but its option: the calibration tokens, the
    number of windows and the decoder blocks' weights (an offloaded checkpoint: its fingerprint)."""
    from llmpress.stats import hash_block_weights, tokens_digest
    h = hashlib.sha256(f"sensitivity-{TABLE_VERSION}:{tokens_digest(tokens)}:{sample_windows}".encode())
    hash_block_weights(h, model, source)
    return h.hexdigest()


def table_key(model, tokens: torch.Tensor, menu: list[MethodConfig], sample_windows: int, source=None,
              estimate: bool = False) -> str:
    """Identifies a table: its rows' key (rows_key), the menu and whether its rows are estimated."""
    h = hashlib.sha256(rows_key(model, tokens, sample_windows, source).encode())
    h.update(json.dumps([c.to_dict() for c in menu]).encode())
    if estimate:
        h.update(b"estimate")
    return h.hexdigest()


def option_id(config: MethodConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:24]


def block_output_grads(walk, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per decoder block, d(sum of next-token losses)/d(block output) on `windows` (S, T) of
    calibration tokens: a list of (S, T, C) float32 tensors on the walk's storage device.

    Backpropagation done block by block along the walk: one forward that keeps every block's
    inputs, the loss gradient at the last block's output through the final norm and LM head, then
    the blocks in reverse, each recomputed from its input and differentiated (a vector-Jacobian
    product), so only one block is ever on the device. Parameters get no gradients."""
    import torch.nn.functional as F
    inputs: list[torch.Tensor] = []
    final = walk.forward_from(walk.capture(windows), 0, record=inputs)
    flags = {p: p.requires_grad for p in walk.model.parameters()}
    grads: list[torch.Tensor | None] = [None] * len(walk)
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            g = []
            with walk.head_placed() as head:
                for k, w in enumerate(windows):
                    h = final[k:k + 1].to(walk.device).requires_grad_(True)
                    logits = head(h)[0, :-1].float()
                    F.cross_entropy(logits, w[1:].to(walk.device), reduction="sum").backward()
                    g.append(h.grad.float().to(walk.storage))
            g = torch.cat(g)                                              # (S, T, C) at the last output
            for i, block in walk.steps("gradients", keep=False, order=range(len(walk) - 1, -1, -1)):
                grads[i] = g
                if i == 0:
                    break
                previous = []
                for k in range(windows.shape[0]):                         # one window at a time: memory
                    x = inputs[i][k:k + 1].to(walk.device).requires_grad_(True)
                    y = block_hidden(block(x, **walk.kwargs))
                    y.backward(g[k:k + 1].to(walk.device, y.dtype))
                    previous.append(x.grad.float().to(walk.storage))
                g = torch.cat(previous)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return grads


@torch.no_grad()
def measure_sensitivity(model, tokens: torch.Tensor, menu: list[MethodConfig], sample_windows: int = 16,
                        batch_size: int = 8, progress: bool = True, device="cpu", source=None,
                        checkpoint=None, only: set[str] | None = None, estimate: bool = False,
                        anchor_menu: list[MethodConfig] | None = None) -> Table:
    """Per layer and option: the option's error in its block's output, block-local, weighted by the
    loss's gradient there (see the module docstring). Statistics come from one forward per block of
    all calibration tokens through the dense model; the error is measured on the first
    `sample_windows` calibration windows. Does not modify `model`. checkpoint: an
    llmpress.checkpoint.Checkpoint recording the gradients and each finished block's rows (a
    killed run resumes at its first unfinished block). only: measure only these (fully qualified
    names), e.g. to re-measure the layers a change touched and replace their rows in a table.

    Every option's row also gets `local_error`: the layer's own output error on all calibration
    tokens, tr(dW H dW^T) with H the mean input Gram matrix (None for methods without one).
    estimate=True: per layer only the anchor (the cheapest option of `anchor_menu`, default `menu`,
    that the layer takes) is measured as above; the other options are solved on a random 1/8 of
    the layer's rows when their method's rows are independent (`rows_independent`: the same rows
    as the whole solve, so their local error scaled by 8 is unbiased), and their rows carry only
    that local error (`"estimated": true`, no `error`): `estimated_rows` scales them by the
    anchor's error / local error. An anchor not in `menu` is left to the caller (its cached row)."""
    from llmpress.modules import linear_bytes
    from llmpress.walk import BlockWalk

    t0 = time.perf_counter()
    if not 0 < sample_windows <= tokens.shape[0]:
        raise LLMPressError(f"sample_windows must be in 1..{tokens.shape[0]} (the calibration windows); got {sample_windows}")
    walk = BlockWalk(model, device, batch_size, progress=False, source=source)
    if walk.world > 1:
        raise LLMPressError("the sensitivity table is measured in one process; run it outside torchrun")
    adapter = walk.adapter
    unknown = None if only is None else sorted(set(only) - set(adapter.linear_names(model)))
    if only is not None and (unknown or not only):
        raise LLMPressError(f"only: {unknown[:5] or 'no layers'} are not compressible linears of this model")
    start = 0 if checkpoint is None else checkpoint.done
    phases = {"gradients": 0.0, "statistics": 0.0, "solve": 0.0, "block_runs": 0.0}   # seconds, this run
    t = time.perf_counter()
    if checkpoint is not None and checkpoint.has("grads"):
        saved = checkpoint.tensors("grads")
        grads = [saved[f"block.{i}"].to(walk.storage) for i in range(len(walk))]
    else:
        grads = block_output_grads(walk, tokens[:sample_windows])
        if checkpoint is not None:
            checkpoint.save_extra("grads", {f"block.{i}": g for i, g in enumerate(grads)})
    phases["gradients"] += time.perf_counter() - t
    n_tokens = sample_windows * (tokens.shape[1] - 1)
    layers: dict[str, dict] = {}
    if start:                                   # resumed: the finished blocks' rows, the next block's inputs
        for rows in checkpoint.entries().values():
            layers.update(rows)
        hidden = walk.resume(tokens, checkpoint.tensors("hidden")["hidden"])
    else:
        hidden = walk.capture(tokens)
    per_block = sum(len(g) for g in adapter.input_groups)
    bar = tqdm(total=len(walk) * per_block, initial=start * per_block, desc="sensitivity", unit="layer",
               disable=not progress)
    dense_bpp = next(model.parameters()).element_size()
    for i, block in walk.steps(keep=False, order=range(start, len(walk))):
        t = time.perf_counter()
        out, stats = walk.collect(block, hidden, walk.all_heads())
        phases["statistics"] += time.perf_counter() - t
        x_sub, y_sub = hidden[:sample_windows], out[:sample_windows]
        tail = adapter.tail
        if tail is not None and (only is None or any(n.startswith(walk.name(i, tail + ".")) for n in only)):
            t = time.perf_counter()
            tail_in, tail_out = _tail_io(walk, block, tail, x_sub)       # (S, T, C) each, dense
            phases["block_runs"] += time.perf_counter() - t
        energy = y_sub.double().square().sum().item()
        g = grads[i].to(walk.device).double()                           # (S, T, C)
        hessians: dict[int, torch.Tensor] = {}                          # one per input group (shared stats)
        for group in adapter.input_groups:
            for local in group:
                if only is not None and walk.name(i, local) not in only:
                    bar.update()
                    continue
                linear = block.get_submodule(local)
                dense_bpp = linear.weight.element_size()
                parent, _, attr = local.rpartition(".")
                o_f, i_f = linear.out_features, linear.in_features
                h = _hessian(stats[local], hessians)
                options = [{"label": "dense", "config": None, "bytes": linear_bytes(linear), "params": o_f * i_f,
                            "error": 0.0, "error_diag": 0.0, "block_error": 0.0, "local_error": 0.0}]
                anchor = _anchor(anchor_menu or menu, o_f, i_f, dense_bpp) if estimate else None
                for config in menu:
                    if config.shape_problem(o_f, i_f):     # e.g. a 256-weight GGUF block on 576 inputs
                        continue
                    nbytes, params = option_cost(config, o_f, i_f, dense_bpp, linear.bias is not None)
                    row = {"label": config.label(), "config": config.to_dict(), "bytes": nbytes, "params": params}
                    sampled = estimate and config != anchor and config.rows_independent() and h is not None
                    t = time.perf_counter()
                    if sampled:                           # a random 1/8 of the rows, the same for every option
                        rows = _sample_rows(o_f, walk.name(i, local))
                        part = _row_subset(linear, rows)
                        module, info = handler_for(config)(part, config, stats[local])
                        row["local_error"] = _local_error(module, part, h) * o_f / len(rows)
                        row["estimated"] = True
                        phases["solve"] += time.perf_counter() - t
                        options.append(row)
                        continue
                    module, info = handler_for(config)(linear, config, stats[local])
                    if nbytes != module.stored_bytes():
                        raise AssertionError(f"cost model disagrees with {config.label()}: {nbytes} vs {module.stored_bytes()}")
                    row["local_error"] = None if h is None else _local_error(module, linear, h)
                    phases["solve"] += time.perf_counter() - t
                    if estimate and config != anchor:     # solved whole (rows not independent), not run
                        row["estimated"] = True
                        options.append(row)
                        continue
                    setattr(block.get_submodule(parent), attr, module.to(linear.weight.device))
                    t = time.perf_counter()
                    try:
                        if tail is not None and local.startswith(tail + "."):
                            d = _run_module(walk, block.get_submodule(tail), tail_in) - tail_out
                        else:
                            d = walk.run(block, x_sub) - y_sub
                    finally:
                        setattr(block.get_submodule(parent), attr, linear)
                    phases["block_runs"] += time.perf_counter() - t
                    d = d.to(walk.device).double()                      # (S, T, C): the block output's change
                    row.update({"error": 0.5 * (g * d).sum(-1).square().sum().item() / n_tokens,
                                "error_diag": 0.5 * (g * d).square().sum().item() / n_tokens,
                                "block_error": d.square().sum().item() / energy})
                    options.append(row)
                layers[walk.name(i, local)] = {"out": o_f, "in": i_f, "params": o_f * i_f, "options": options}
                bar.update()
        hidden = out                                      # dense outputs feed the next block
        if checkpoint is not None:
            checkpoint.record(i, {"hidden": {"hidden": hidden}} if i + 1 < len(walk) else {},
                              {n: layers[n] for n in layers if n.startswith(walk.name(i, ""))})
    bar.close()
    meta = {"menu": [c.to_dict() for c in menu], "sample_windows": sample_windows, "tokens": list(tokens.shape),
            "dense_bytes_per_param": dense_bpp, "device": str(walk.device),
            "error": "estimated loss increase, nats/token (empirical Fisher quadratic form of the block output change, per token)", "seconds": time.perf_counter() - t0,
            "phase_seconds": phases}
    return Table(layers, meta)


def _tail_io(walk, block, tail: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of `block`'s submodule `tail` when the block runs on `hidden`
    (N, T, C): two (N, T, C) tensors on the walk's storage device."""
    inputs, outputs = [], []

    def hook(module, args, output):
        inputs.append(args[0].detach().to(walk.storage))
        outputs.append((output[0] if isinstance(output, tuple) else output).detach().to(walk.storage))
    handle = block.get_submodule(tail).register_forward_hook(hook)
    try:
        walk.run(block, hidden)
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(outputs)


def _run_module(walk, module, inputs: torch.Tensor) -> torch.Tensor:
    """module(inputs) in batches of the walk's batch size, on its device; back on the storage device."""
    outs = []
    for s in range(0, inputs.shape[0], walk.batch_size):
        y = module(inputs[s:s + walk.batch_size].to(walk.device))
        outs.append((y[0] if isinstance(y, tuple) else y).to(walk.storage))
    return torch.cat(outs)


ESTIMATE_ROWS = 8                # estimate=True solves 1/ESTIMATE_ROWS of a layer's rows (at least 32)


def _hessian(stats, memo: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """The mean input Gram matrix (in, in) of a layer's statistics, once per shared statistic."""
    if stats is None or stats.gram is None:
        return None
    if id(stats) not in memo:
        memo[id(stats)] = stats.hessian()
    return memo[id(stats)]


def _local_error(module, linear, h: torch.Tensor) -> float:
    """tr(dW H dW^T): the mean over calibration tokens of ||(W' - W) x||^2, the layer's own error."""
    dw = module.dense_weight().float().to(h.device) - linear.weight.detach().float().to(h.device)   # (out, in)
    return ((dw @ h) * dw).sum(dtype=torch.float64).item()


def _sample_rows(out_features: int, name: str) -> torch.Tensor:
    """A sorted random subset of the rows (1/ESTIMATE_ROWS, at least 32), seeded by the layer's name."""
    k = min(out_features, max(32, -(-out_features // ESTIMATE_ROWS)))
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return torch.randperm(out_features, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _row_subset(linear, rows: torch.Tensor):
    """An nn.Linear holding these output rows of `linear` (its weights copied, same dtype/device)."""
    part = torch.nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None,
                           device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        part.weight.copy_(linear.weight[rows.to(linear.weight.device)])
        if linear.bias is not None:
            part.bias.copy_(linear.bias[rows.to(linear.bias.device)])
    return part


def _anchor(menu: list[MethodConfig], out_f: int, in_f: int, dense_bpp: int) -> MethodConfig | None:
    """The option measured in full on a layer under estimate=True: the cheapest it takes (the largest
    error, so the best-resolved ratio of block error to layer error)."""
    valid = [c for c in menu if not c.shape_problem(out_f, in_f)]
    return min(valid, key=lambda c: option_cost(c, out_f, in_f, dense_bpp)[0]) if valid else None


def estimated_rows(options: list[dict], anchor_label: str) -> list[dict]:
    """A layer's options with every estimated row's errors set to its local error times the
    anchor's ratio (error / local_error, per error field); measured rows as they are."""
    anchor = next(o for o in options if o["label"] == anchor_label)
    if anchor.get("error") is None:
        raise AssertionError(f"the anchor {anchor_label} of a layer has no measured error")
    out = []
    for o in options:
        if o.get("error") is None:
            la = anchor["local_error"]
            out.append({**o, **{f: (anchor[f] * o["local_error"] / la if la > 0 else 0.0)
                                for f in ("error", "error_diag", "block_error")}})
        else:
            out.append(o)
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")) / "sensitivity"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def sensitivity_table(model, tokens: torch.Tensor, menu: list[MethodConfig], sample_windows: int,
                      path: str | Path | None = None, progress: bool = True, device="cpu", source=None,
                      batch_size: int = 8, estimate: bool = False) -> tuple[Table, Path]:
    """The table for (model, tokens, menu, sample_windows): read from `path` (default: the cache
    folder, named by its key) when it is there; otherwise assembled from the cache's rows, one file
    per menu option (each option's rows are measured alone: they do not depend on the rest of the
    menu), measuring only the options no earlier run measured, and saved at `path`. A file at an
    explicit path measured for something else is refused.

    estimate=True: only each layer's anchor is measured, the other options' errors are estimated
    from their local errors (measure_sensitivity); measured rows in the cache serve both kinds of
    table, estimated rows only estimated tables."""
    key = table_key(model, tokens, menu, sample_windows, source, estimate)
    path = Path(path) if path else default_cache_dir() / f"{key[:32]}.json"
    if path.is_file():
        table = Table.load(path)
        if table.meta.get("key") != key:
            raise LLMPressError(f"{path} was measured for another model, calibration data or menu")
        if progress:
            print(f"sensitivity table read from {path}")
        return table, path
    from llmpress.checkpoint import Checkpoint
    rkey = rows_key(model, tokens, sample_windows, source)
    rows_dir = default_cache_dir() / "rows" / rkey[:32]
    cached: dict[str, dict] = {}
    for config in menu:
        f = rows_dir / f"{option_id(config)}.json"
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue                                  # unreadable: measured again, file replaced
            rows = d.get("rows", {}).values()
            # estimated rows serve only estimates; an estimate needs every row's local error (older rows lack it)
            usable = (all("local_error" in r for r in rows) if estimate else not any(r.get("estimated") for r in rows))
            if d.get("key") == rkey and d.get("config") == config.to_dict() and usable:
                cached[option_id(config)] = d
    layers_file = rows_dir / "layers.json"
    if not layers_file.is_file():                         # the layers' shapes and dense rows go with the rows
        cached = {}
    anchors = {}                                          # estimate: layer -> the option measured in full on it
    if estimate and cached:
        base = json.loads(layers_file.read_text())
        bpp = base["meta"]["dense_bytes_per_param"]
        anchors = {n: _anchor(menu, layer["out"], layer["in"], bpp) for n, layer in base["layers"].items()}
        for n, a in anchors.items():                       # a cached anchor row must have been measured
            d = cached.get(option_id(a)) if a is not None else None
            if d is not None and d["rows"].get(n, {}).get("error") is None:
                cached.pop(option_id(a))
    missing = [c for c in menu if option_id(c) not in cached]
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows_dir.mkdir(parents=True, exist_ok=True)
        part_key = table_key(model, tokens, missing + (menu if estimate else []), sample_windows, source, estimate)
        # a killed measurement resumes from its partial folder (same key: same model, tokens and options)
        partial = Checkpoint.resume_or_start(path.with_name(path.name + ".partial"),
                                             {"sample_windows": sample_windows, "batch_size": batch_size}, part_key)
        if progress:
            if cached:
                print(f"sensitivity: {len(cached)} of {len(menu)} options' rows reused from {rows_dir}")
            if partial.done:
                print(f"sensitivity: resuming at block {partial.done} from {partial.folder}")
        measured = measure_sensitivity(model, tokens, missing, sample_windows=sample_windows, batch_size=batch_size,
                                       progress=progress, device=device, source=source, checkpoint=partial,
                                       estimate=estimate, anchor_menu=menu)
        share = measured.meta["seconds"] / len(missing)
        for config in missing:                            # one file per option: its row on every layer that takes it
            rows = {n: o for n, layer in measured.layers.items() for o in layer["options"][1:]
                    if o["config"] == config.to_dict()}
            d = {"key": rkey, "config": config.to_dict(), "label": config.label(), "rows": rows, "seconds": share}
            _write_json(rows_dir / f"{option_id(config)}.json", d)
            cached[option_id(config)] = d
        _write_json(layers_file, {"key": rkey, "meta": {k: v for k, v in measured.meta.items()
                                                        if k not in ("menu", "seconds", "phase_seconds")},
                                  "layers": {n: {**{f: layer[f] for f in ("out", "in", "params")},
                                                 "dense": layer["options"][0]} for n, layer in measured.layers.items()}})
        partial.remove()
        seconds = measured.meta["seconds"]
    else:
        seconds = 0.0
    base = json.loads(layers_file.read_text())
    layers = {n: {"out": layer["out"], "in": layer["in"], "params": layer["params"],
                  "options": [layer["dense"]] + [cached[option_id(c)]["rows"][n] for c in menu
                                                 if n in cached[option_id(c)]["rows"]]}
              for n, layer in base["layers"].items()}
    n_estimated = 0
    if estimate:
        bpp = base["meta"]["dense_bytes_per_param"]
        for n, layer in layers.items():
            a = _anchor(menu, layer["out"], layer["in"], bpp)
            if a is not None:
                n_estimated += sum(o.get("error") is None for o in layer["options"])
                layer["options"] = estimated_rows(layer["options"], a.label())
    table = Table(layers, {**base["meta"], "menu": [c.to_dict() for c in menu], "key": key, "seconds": seconds,
                           "estimate": estimate, "estimated_rows": n_estimated,
                           "phase_seconds": measured.meta["phase_seconds"] if missing else {},
                           "measured": [c.label() for c in missing],
                           "reused": [c.label() for c in menu if c not in missing]})
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    if progress:
        phases = ", ".join(f"{k.replace('_', ' ')} {v:.0f}s" for k, v in table.meta["phase_seconds"].items())
        print(f"sensitivity measured in {seconds:.0f}s ({len(missing)} of {len(menu)} options"
              f"{': ' + phases if phases else ''}), saved to {path}")
    return table, path


@dataclass
class Allocation:
    """What `plan_for_budget` returns: the Plan, the per-layer choice it came from, the table and a
    summary (allocator, sizes, use of the budget, the table's path)."""
    plan: "object"
    choice: dict[str, int]
    table: Table
    info: dict


def plan_for_budget(model, tokens: torch.Tensor, budget: Budget, menu: list[MethodConfig],
                    allocator: str = "knapsack", *, held_out: torch.Tensor | None = None, fuse: bool = False,
                    sample_windows: int | None = None, table_path: str | Path | None = None,
                    search_steps: int = 40, refine_rounds: int = 1, progress: bool = True,
                    device="cpu", source=None, estimate: bool = False, target: str = "vllm") -> Allocation:
    """Compress to a budget, the planning half: check the budget is reachable (from the layer
    shapes alone, before any measurement), get the sensitivity table (cached), and allocate.
    held_out: calibration windows disjoint from `tokens`, needed by the search and refine allocators.
    fuse: the layers `target` needs on one scheme share one choice (allocate.fused_groups)."""
    from llmpress.allocate import allocate, fused_groups, to_plan

    check_budget(model, menu, budget)
    if fuse and allocator in ("search", "refine"):
        raise LLMPressError(f"fused groups are supported by the knapsack and lagrange allocators, not by {allocator}")
    extra: dict = {}
    if allocator in ("search", "refine"):
        if held_out is None:
            raise LLMPressError(f"the {allocator} allocator needs held-out calibration windows")
        if source is not None:
            raise LLMPressError(f"the {allocator} allocator needs the model in memory (not offloaded)")
        extra = {"model": model, "stats_tokens": tokens, "eval_tokens": held_out, "progress": progress}
        extra.update({"steps": search_steps} if allocator == "search" else {"rounds": refine_rounds})
    if fuse:
        extra["fuse_groups"] = fused_groups(model, target)
    sample_windows = sample_windows or min(16, tokens.shape[0])
    table, path = sensitivity_table(model, tokens, menu, sample_windows, table_path, progress, device, source,
                                    estimate=estimate)
    choice, info = allocate(table, budget, allocator, **extra)
    info["sensitivity_table"] = str(path)
    info["sensitivity"] = {k: table.meta.get(k) for k in ("seconds", "phase_seconds", "measured", "reused", "estimate",
                                                          "estimated_rows")}
    return Allocation(to_plan(table, choice), choice, table, info)
