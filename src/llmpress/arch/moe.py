"""Mixture-of-experts blocks: each architecture's expert layout as data, and the module that holds
its experts as ordinary linears so that every method, plan rule, allocator and export sees one
expert's projection as one layer.

transformers 5 stores a layer's experts fused, one 3-D parameter per projection: `gate_up_proj`
(E, 2I, H) whose rows [0, I) are the gate and [I, 2I) the up projection, and `down_proj` (E, H, I),
behind a router that hands the experts module (hidden (S, H), top_k_index (S, k), top_k_weights
(S, k)). `unfuse_experts` replaces that module by `RoutedExperts`: the same forward, one
`ExpertMLP` (gate_proj, up_proj, down_proj as nn.Linear) per expert, whose weights are views of the
fused tensors (no copy: memory stays as it was until an expert's linears are replaced by their
compressed form). A forward hook on expert e's gate_proj therefore sees exactly the tokens the
router sends to e, which is the per-expert calibration GPTQ-style methods need.

The router (a (E, H) weight, not a linear) and Qwen2-MoE's sigmoid `shared_expert_gate` (H -> 1) stay
dense; the shared expert is an ordinary MLP whose linears are compressed like a dense block's.

Layouts (transformers 5.24, checked in tests/test_moe.py by building each model from a config):
- qwen2_moe: `mlp.{gate, experts, shared_expert, shared_expert_gate}`; qwen3_moe, olmoe:
  `mlp.{gate, experts}`; mixtral: `mlp.{gate, experts}` (its Hub checkpoints name the block
  `block_sparse_moe` and the projections w1 / w3 / w2); granitemoe: `block_sparse_moe.{router,
  experts}` (its Hub checkpoints keep the experts fused: `input_linear` (E, 2I, H), `output_linear`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from llmpress.errors import LLMPressError


@dataclass(frozen=True)
class MoELayout:
    moe_path: str                    # the sparse block inside a decoder block ("mlp")
    router: str                      # the router's attribute in it
    experts_key: str                 # config attribute with the number of routed experts
    intermediate_key: str            # config attribute with one expert's intermediate size
    shared_expert: str | None = None  # attribute of an always-on shared MLP (qwen2_moe)
    hub: str = "per_expert"          # how Hub checkpoints store experts: per_expert | mixtral | fused

    def num_experts(self, config) -> int:
        return int(getattr(config, self.experts_key))

    def expert_prefix(self) -> str:
        return f"{self.moe_path}.experts"

    def groups(self, config) -> tuple[tuple[str, ...], ...]:
        """Input groups of the MoE part of one block: the shared expert's (gate, up), (down), then
        every routed expert's (gate, up) and (down); each expert reads its own routed tokens."""
        out = []
        if self.shared_expert:
            s = f"{self.moe_path}.{self.shared_expert}"
            out += [(f"{s}.gate_proj", f"{s}.up_proj"), (f"{s}.down_proj",)]
        for e in range(self.num_experts(config)):
            p = f"{self.expert_prefix()}.{e}"
            out += [(f"{p}.gate_proj", f"{p}.up_proj"), (f"{p}.down_proj",)]
        return tuple(out)


MOE_LAYOUTS: dict[str, MoELayout] = {
    "qwen2_moe": MoELayout("mlp", "gate", "num_experts", "moe_intermediate_size", shared_expert="shared_expert"),
    "qwen3_moe": MoELayout("mlp", "gate", "num_experts", "moe_intermediate_size"),
    "olmoe": MoELayout("mlp", "gate", "num_experts", "intermediate_size"),
    "mixtral": MoELayout("mlp", "gate", "num_local_experts", "intermediate_size", hub="mixtral"),
    "granitemoe": MoELayout("block_sparse_moe", "router", "num_local_experts", "intermediate_size", hub="fused"),
}

# Not supported yet, and why (the error names these).
LEFT_OUT = {
    "deepseek_v3": "multi-head latent attention (q_a/q_b/kv_a/kv_b projections) and dense first layers",
    "deepseek_v2": "multi-head latent attention and dense first layers",
}


def check_uniform_layers(config) -> None:
    """Every decoder block must be sparse: llmpress's adapters give all blocks the same layers.
    Qwen-MoE configs may make some blocks dense (mlp_only_layers, decoder_sparse_step)."""
    if getattr(config, "mlp_only_layers", None):
        raise LLMPressError(f"{config.model_type}: mlp_only_layers={config.mlp_only_layers} mixes dense and "
                            "sparse blocks, which llmpress does not support yet")
    step = getattr(config, "decoder_sparse_step", 1)
    if step not in (None, 1):
        raise LLMPressError(f"{config.model_type}: decoder_sparse_step={step} mixes dense and sparse blocks, "
                            "which llmpress does not support yet")


class ExpertMLP(nn.Module):
    """One expert: x (n, H) -> down(act(gate(x)) * up(x)) (n, H)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.ModuleList):
    """A layer's routed experts, a ModuleList of ExpertMLP (so the state dict says
    `experts.{e}.gate_proj.weight`, the Hub's per-expert naming, which transformers' MoE loaders fuse);
    forward as transformers' fused experts module: (hidden (S, H), top_k_index (S, k), top_k_weights
    (S, k)) -> (S, H), the sum over each token's k experts of weight * expert(token).

    calibrate_all=True (set by `all_experts_calibration`, for statistics only): every expert runs on
    every token, so its input statistics see all S tokens, while the output still adds only each
    token's routed experts (llm-compressor's calibrate-all-experts); costs E / k times the compute."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.calibrate_all = False
        self.weight_stats = False           # set by router_weighted_calibration: statistics weighted by g
        self.record: dict | None = None     # set by llmpress.experts.recording: per-expert routing sums

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, pos = torch.where(top_k_index == e)          # (n,), (n,): the tokens routed to e
            if self.calibrate_all:
                y = expert(hidden_states)[token_idx]
            elif token_idx.numel() == 0:
                continue          # (a record keeps its zeros for this expert)
            elif self.weight_stats:               # each routed token's statistics weighted by its router weight
                g = top_k_weights[token_idx, pos]
                for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
                    lin._stat_weight = g
                try:
                    y = expert(hidden_states[token_idx])
                finally:
                    for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
                        del lin._stat_weight
            else:
                y = expert(hidden_states[token_idx])
            g = top_k_weights[token_idx, pos, None]                   # (n, 1) router weights
            if self.record is not None:
                self.record["tokens"][e] += token_idx.numel()
                self.record["gate"][e] += g.double().sum().item()
                self.record["reap"][e] += (g[:, 0].double() * y.double().norm(dim=-1)).sum().item()
            out.index_add_(0, token_idx, (y * g).to(out.dtype))
        return out


def layout_of(model_or_config) -> MoELayout | None:
    config = getattr(model_or_config, "config", model_or_config)
    return MOE_LAYOUTS.get(getattr(config, "model_type", None))


def unfuse_experts(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Replace every fused experts module of `model`'s blocks by a RoutedExperts whose linears are
    views of the fused weights (in place; idempotent)."""
    layout = layout_of(model)
    if layout is None:
        return
    for block in blocks:
        moe = block.get_submodule(layout.moe_path)
        fused = moe.experts
        if isinstance(fused, RoutedExperts):
            continue
        if not (hasattr(fused, "gate_up_proj") and hasattr(fused, "down_proj")):
            raise LLMPressError(f"{model.config.model_type}: expected fused experts with gate_up_proj / "
                                f"down_proj, found {type(fused).__name__}")
        moe.experts = RoutedExperts(split_fused(fused.gate_up_proj, fused.down_proj, fused.act_fn,
                                                getattr(fused, "gate_up_proj_bias", None),
                                                getattr(fused, "down_proj_bias", None)))


def split_fused(gate_up: torch.Tensor, down: torch.Tensor, act_fn, gate_up_bias=None, down_bias=None) -> list[ExpertMLP]:
    """gate_up (E, 2I, H), down (E, H, I) -> E ExpertMLPs whose weights are views (no copy)."""
    if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[0] != down.shape[0] or gate_up.shape[1] % 2:
        raise LLMPressError(f"fused experts of shapes {tuple(gate_up.shape)} / {tuple(down.shape)} are not "
                            "(E, 2I, H) / (E, H, I)")
    n, two_i, h = gate_up.shape
    i = two_i // 2
    experts = []
    for e in range(n):
        lin = []
        for w, b in ((gate_up.data[e, :i], None if gate_up_bias is None else gate_up_bias.data[e, :i]),
                     (gate_up.data[e, i:], None if gate_up_bias is None else gate_up_bias.data[e, i:]),
                     (down.data[e], None if down_bias is None else down_bias.data[e])):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
            layer.weight = nn.Parameter(w, requires_grad=False)
            if b is not None:
                layer.bias = nn.Parameter(b, requires_grad=False)
            lin.append(layer)
        experts.append(ExpertMLP(*lin, act_fn))
    return experts


class _ExpertsFlag:
    """Within the `with`: the attribute `flag` of every RoutedExperts of `block` is True."""
    flag = ""

    def __init__(self, block: nn.Module, on: bool = True):
        self.modules = [m for m in block.modules() if isinstance(m, RoutedExperts)] if on else []

    def __enter__(self):
        for m in self.modules:
            setattr(m, self.flag, True)
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            setattr(m, self.flag, False)


class all_experts_calibration(_ExpertsFlag):
    """Within the `with`: every RoutedExperts of `block` runs all experts on all tokens (statistics
    only; outputs unchanged up to float rounding:
    a matmul over all tokens rounds a routed token's row differently from one over its subset)."""
    flag = "calibrate_all"


class router_weighted_calibration(_ExpertsFlag):
    """Within the `with`: the input statistics of every routed expert of `block` weigh each token by
    its router weight g (the statistics hook scales the input by g, so X^T X becomes sum g^2 x x^T):
    the expert's output enters the block's output times g, so its output error there is
    sum_t g_t^2 ||dW x_t||^2, the error GPTQ / SparseGPT / SVD-LLM then minimize. Token counts stay
    the routed counts (the few-token fallback reads them)."""
    flag = "weight_stats"


_EXPERT = re.compile(r"^(.*?)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def hub_module(config, fqn: str) -> str:
    """llmpress's name of an expert projection -> the architecture's Hub checkpoint name (mixtral:
    `model.layers.0.mlp.experts.3.up_proj` -> `model.layers.0.block_sparse_moe.experts.3.w3`); other
    names unchanged. Fused Hub layouts (granitemoe) have no per-expert module: refused."""
    layout = layout_of(config)
    m = _EXPERT.match(fqn)
    if layout is None or m is None or layout.hub == "per_expert":
        return fqn
    if layout.hub == "fused":
        raise LLMPressError(f"{config.model_type} checkpoints store experts fused: {fqn} has no module of its own "
                            "there; export dense or native")
    block = m.group(1).removesuffix("." + layout.moe_path)
    return f"{block}.block_sparse_moe.experts.{m.group(2)}.{_MIXTRAL[m.group(3)]}"


def router_names(config) -> list[str]:
    """compressed-tensors `ignore` patterns of the layers that stay dense in a MoE block (router,
    shared-expert gate)."""
    layout = layout_of(config)
    if layout is None:
        return []
    path = "block_sparse_moe" if layout.hub == "mixtral" else layout.moe_path
    out = [f"re:.*\\.{path}\\.{layout.router}$"]
    if layout.shared_expert:
        out.append(f"re:.*\\.{layout.moe_path}\\.{layout.shared_expert}_gate$")
    return out


def hub_names(config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with llmpress's per-expert names -> the names (and, for fused Hub layouts, the
    stacking) of the architecture's Hub checkpoints, which transformers and vLLM read:
    mixtral `block_sparse_moe.experts.{e}.w1|w3|w2.*` (its router `block_sparse_moe.gate`);
    granitemoe `input_linear.weight` (E, 2I, H), `output_linear.weight` (E, H, I) and
    `router.layer.weight` (dense weights only: its checkpoints have no per-expert tensors to hold
    a compressed form); others unchanged."""
    layout = layout_of(config)
    if layout is None or layout.hub == "per_expert":
        return tensors
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, leaf = key.rpartition(".")
        m = _EXPERT.match(module)
        if m is None:
            if layout.hub == "mixtral" and f".{layout.moe_path}.{layout.router}." in key + ".":
                key = key.replace(f".{layout.moe_path}.{layout.router}.", f".block_sparse_moe.{layout.router}.")
            elif layout.hub == "fused" and key.endswith(f".{layout.moe_path}.{layout.router}.weight"):
                key = key[:-len("weight")] + "layer.weight"
            out[key] = t
        elif layout.hub == "mixtral":
            out[f"{hub_module(config, module)}.{leaf}"] = t
        elif leaf != "weight":
            hub_module(config, module)                                   # raises: no place for it
        else:
            stacks.setdefault(m.group(1), {})[(m.group(3), int(m.group(2)))] = t
    for moe, parts in stacks.items():
        n = 1 + max(e for _, e in parts)
        out[f"{moe}.input_linear.weight"] = torch.stack(
            [torch.cat([parts[("gate_proj", e)], parts[("up_proj", e)]]) for e in range(n)])
        out[f"{moe}.output_linear.weight"] = torch.stack([parts[("down_proj", e)] for e in range(n)])
    return out


_MIXTRAL_BACK = {v: k for k, v in _MIXTRAL.items()}


def from_hub_names(config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `hub_names`: a checkpoint's tensors under the architecture's Hub names ->
    llmpress's per-expert names (mixtral's `block_sparse_moe.experts.{e}.w1|w3|w2` and its router;
    granitemoe's stacked `input_linear` / `output_linear` split per expert, `router.layer`); what
    reading a block of the checkpoint on its own (`--offload`) needs."""
    layout = layout_of(config)
    if layout is None or layout.hub == "per_expert":
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if layout.hub == "mixtral":
            m = re.match(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.(\w+)$", key)
            if m:
                key = f"{m.group(1)}.{layout.moe_path}.experts.{m.group(2)}.{_MIXTRAL_BACK[m.group(3)]}.{m.group(4)}"
            else:
                key = key.replace(f".block_sparse_moe.{layout.router}.", f".{layout.moe_path}.{layout.router}.")
            out[key] = t
        elif key.endswith(".input_linear.weight"):                     # (E, 2I, H)
            moe, i = key[:-len(".input_linear.weight")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{moe}.experts.{e}.gate_proj.weight"] = t[e, :i]
                out[f"{moe}.experts.{e}.up_proj.weight"] = t[e, i:]
        elif key.endswith(".output_linear.weight"):                    # (E, H, I)
            moe = key[:-len(".output_linear.weight")]
            for e in range(t.shape[0]):
                out[f"{moe}.experts.{e}.down_proj.weight"] = t[e]
        elif key.endswith(f".{layout.router}.layer.weight"):
            out[key[:-len("layer.weight")] + "weight"] = t
        else:
            out[key] = t
    return out
