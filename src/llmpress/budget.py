"""One budget across layers and methods: costs counted as the export stores them, a sensitivity
table measured once per (model, calibration data, menu), saved as JSON.

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
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmpress.config import MethodConfig, config_from_dict, handler_for, parse_method_spec
from llmpress.errors import LLMPressError

TABLE_VERSION = 3
METRICS = ("params", "bits", "bytes")

# method -> the levels it contributes to a menu
MENU_LEVELS = {
    "gptq": [f"gptq:bits={b},group_size=128" for b in (2, 3, 4, 8)],
    "rtn": [f"rtn:bits={b},group_size=128" for b in (2, 3, 4, 8)],
    "sparsegpt": [f"sparsegpt:sparsity={s / 10}" for s in range(1, 10)],
    "wanda": [f"wanda:sparsity={s / 10}" for s in range(1, 10)],
    "magnitude": [f"magnitude:sparsity={s / 10}" for s in range(1, 10)],
    "svd-llm": [f"svd-llm:param_ratio={r / 10}" for r in range(3, 10)],
    "asvd": [f"asvd:param_ratio={r / 10}" for r in range(3, 10)],
    "svd": [f"svd:param_ratio={r / 10}" for r in range(3, 10)],
}
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
    out = []
    for name in filter(None, (m.strip() for m in menu.split(","))):
        if name in MENU_LEVELS:
            out += [parse_method_spec(s) for s in MENU_LEVELS[name]]
        else:   # an explicit setting, e.g. gptq:bits=3,group_size=64 (use ';' between such items)
            raise LLMPressError(f"unknown menu item {name!r}; menu methods: {', '.join(MENU_LEVELS)}")
    if not out:
        raise LLMPressError("the menu is empty")
    return out


def option_cost(config: MethodConfig | None, out_f: int, in_f: int, dense_bytes_per_param: int) -> tuple[int, int]:
    """(bytes as stored, parameters kept) of one layer under `config`; mirrors llmpress.modules."""
    from llmpress.methods.lowrank import rank_for_ratio
    from llmpress.methods.magnitude import parse_nm
    from llmpress.methods.sparsegpt import BLOCK
    n = out_f * in_f
    if config is None:
        return n * dense_bytes_per_param, n
    if config.family == "quantization":
        groups = math.ceil(in_f / config.group_size)
        nbytes = math.ceil(n * config.bits / 8) + out_f * groups * 2
        if not config.symmetric:
            nbytes += math.ceil(out_f * groups * config.bits / 8)
        return nbytes, n
    if config.family == "pruning":
        if config.nm:
            keep_n, m = parse_nm(config.nm)
            nnz = n // m * keep_n
        elif config.method == "wanda":
            nnz = out_f * (in_f - round(config.sparsity * in_f))
        elif config.method == "sparsegpt":
            nnz = sum(out_f * min(BLOCK, in_f - s) - round(config.sparsity * out_f * min(BLOCK, in_f - s))
                      for s in range(0, in_f, BLOCK))
        else:
            nnz = n - round(config.sparsity * n)
        return math.ceil(n / 8) + 2 * nnz, nnz
    if config.family == "low-rank":
        r = rank_for_ratio(out_f, in_f, config.param_ratio)
        return 2 * r * (out_f + in_f), r * (out_f + in_f)
    raise LLMPressError(f"no cost model for method {config.method!r}")


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


    def with_error(self, field: str) -> "Table":
        """The same table with another of its estimates (e.g. error_diag) as the `error` the
        allocators read: compare estimators without measuring again."""
        if any(field not in o for layer in self.layers.values() for o in layer["options"]):
            raise LLMPressError(f"this table has no {field!r} for every option")
        layers = {n: {**layer, "options": [{**o, "error": o[field]} for o in layer["options"]]}
                  for n, layer in self.layers.items()}
        return Table(layers, {**self.meta, "error_field": field})


def table_key(model, tokens: torch.Tensor, menu: list[MethodConfig], sample_windows: int) -> str:
    from llmpress.stats import tokens_digest
    h = hashlib.sha256(f"sensitivity-{TABLE_VERSION}:{tokens_digest(tokens)}:{sample_windows}".encode())
    h.update(json.dumps([c.to_dict() for c in menu]).encode())
    for name, t in sorted(model.state_dict().items()):
        if ".layers." in name:
            h.update(name.encode())
            h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def block_output_grads(model, blocks, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per decoder block, d(sum of next-token losses)/d(block output) on `windows` (S, T) of
    calibration tokens: a list of (S, T, C) float32 tensors. One forward + backward per window;
    parameters get no gradients (their requires_grad is switched off and restored)."""
    import torch.nn.functional as F
    from llmpress.pipeline import block_hidden
    grads: list[list[torch.Tensor]] = [[] for _ in blocks]

    def block_hook(i):
        def hook(module, args, output):
            block_hidden(output).register_hook(lambda g: grads[i].append(g.detach().float()))
        return hook

    def embed_hook(module, args, output):
        return output.detach().requires_grad_(True)       # the graph starts at the embeddings

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [b.register_forward_hook(block_hook(i)) for i, b in enumerate(blocks)]
    handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for w in windows:
                logits = model(w[None], use_cache=False).logits[0, :-1].float()
                F.cross_entropy(logits, w[1:], reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return [torch.cat(g) for g in grads]


@torch.no_grad()
def measure_sensitivity(model, tokens: torch.Tensor, menu: list[MethodConfig], sample_windows: int = 16,
                        batch_size: int = 8, progress: bool = True) -> Table:
    """Per layer and option: the option's error in its block's output, block-local, weighted by the
    loss's gradient there (see the module docstring). Statistics come from one forward per block of
    all calibration tokens through the dense model; the error is measured on the first
    `sample_windows` calibration windows. Does not modify `model`."""
    from llmpress.arch import adapter_for
    from llmpress.pipeline import _collect_block_stats, _run_block, capture_block_inputs
    from llmpress.modules import linear_bytes

    t0 = time.perf_counter()
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    prefix = adapter.blocks_path
    dense_bpp = next(model.parameters()).element_size()
    if not 0 < sample_windows <= tokens.shape[0]:
        raise LLMPressError(f"sample_windows must be in 1..{tokens.shape[0]} (the calibration windows); got {sample_windows}")
    grads = block_output_grads(model, blocks, tokens[:sample_windows])
    n_tokens = sample_windows * (tokens.shape[1] - 1)
    hidden, kwargs = capture_block_inputs(model, blocks, tokens, batch_size)
    layers: dict[str, dict] = {}
    bar = tqdm(total=len(blocks) * sum(len(g) for g in adapter.input_groups), desc="sensitivity", unit="layer",
               disable=not progress)
    for i, block in enumerate(blocks):
        out, stats = _collect_block_stats(block, adapter, prefix, i, {}, hidden, kwargs, batch_size, all_groups=True)
        x_sub, y_sub = hidden[:sample_windows], out[:sample_windows]
        energy = y_sub.double().square().sum().item()
        g = grads[i].double()                               # (S, T, C)
        for group in adapter.input_groups:
            for local in group:
                linear = block.get_submodule(local)
                parent, _, attr = local.rpartition(".")
                o_f, i_f = linear.out_features, linear.in_features
                options = [{"label": "dense", "config": None, "bytes": linear_bytes(linear), "params": o_f * i_f,
                            "error": 0.0, "error_diag": 0.0, "block_error": 0.0}]
                for config in menu:
                    module, info = handler_for(config)(linear, config, stats[local])
                    setattr(block.get_submodule(parent), attr, module)
                    try:
                        y = _run_block(block, x_sub, kwargs, batch_size)
                    finally:
                        setattr(block.get_submodule(parent), attr, linear)
                    nbytes, params = option_cost(config, o_f, i_f, dense_bpp)
                    if nbytes != module.stored_bytes():
                        raise AssertionError(f"cost model disagrees with {config.label()}: {nbytes} vs {module.stored_bytes()}")
                    d = (y - y_sub).double()                # (S, T, C)
                    options.append({"label": config.label(), "config": config.to_dict(), "bytes": nbytes,
                                    "params": params, "error": 0.5 * (g * d).sum(-1).square().sum().item() / n_tokens,
                                    "error_diag": 0.5 * (g * d).square().sum().item() / n_tokens,
                                    "block_error": d.square().sum().item() / energy})
                layers[f"{prefix}.{i}.{local}"] = {"out": o_f, "in": i_f, "params": o_f * i_f, "options": options}
                bar.update()
        hidden = out                                      # dense outputs feed the next block
    bar.close()
    meta = {"menu": [c.to_dict() for c in menu], "sample_windows": sample_windows, "tokens": list(tokens.shape),
            "dense_bytes_per_param": dense_bpp,
            "error": "estimated loss increase, nats/token (empirical Fisher quadratic form of the block output change, per token)", "seconds": time.perf_counter() - t0}
    return Table(layers, meta)
