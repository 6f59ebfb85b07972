"""Architecture adapters: where the decoder blocks are, which linears they hold, which of those
read the same input (and so share one calibration statistic) and which serving engines fuse.
Mixture-of-experts layouts are in llmpress.arch.moe: their adapters are built per model (the
expert count is in the config) and list every expert's projections as linears of their own."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmpress.arch.moe import LEFT_OUT, MOE_LAYOUTS, MoELayout, check_uniform_layers, unfuse_experts
from llmpress.errors import LLMPressError


@dataclass(frozen=True)
class Adapter:
    blocks_path: str                 # attribute path from the CausalLM to the ModuleList of blocks
    # Linears inside one block, grouped by the tensor they read: members of a group see the same
    # input, so one Hessian serves them all; these are also the groups engines fuse (q/k/v, gate/up).
    input_groups: tuple[tuple[str, ...], ...]
    # What produces each group's input, keyed by the group's first member: an RMSNorm (whose
    # weight can absorb a per-channel scale) or a linear (whose output rows can). Used by AWQ.
    input_source: tuple[tuple[str, str], ...] = ()
    norm_offset: float = 0.0          # RMSNorm multiplies by (offset + weight): 1 for Gemma
    final_norm_path: str = "model.norm"   # the norm between the last block and the LM head
    moe: MoELayout | None = None      # the sparse block's layout, for mixture-of-experts models
    # A submodule whose output the block adds to the residual stream as its very last step
    # (block(x) = h + tail(norm(h))): a change inside it changes the block's output by exactly the
    # change in its own output, so the sensitivity table runs only the tail for its linears.
    tail: str | None = None

    def is_expert(self, local: str) -> bool:
        """Whether a block-local linear name is one of the routed experts' projections."""
        return self.moe is not None and local.startswith(self.moe.expert_prefix() + ".")

    def source_of(self, head: str) -> str | None:
        return dict(self.input_source).get(head)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for name in self.blocks_path.split("."):
            obj = getattr(obj, name)
        return obj

    def block_index(self, name: str) -> int:
        """The decoder block a module's fully qualified name lies in: 'model.layers.7.mlp.up_proj' -> 7."""
        prefix = self.blocks_path + "."
        if not name.startswith(prefix):
            raise LLMPressError(f"{name} is not inside {self.blocks_path}")
        return int(name[len(prefix):].split(".")[0])

    def linear_names(self, model: nn.Module) -> list[str]:
        """Fully qualified names of every compressible linear, in block order."""
        return [f"{self.blocks_path}.{i}.{name}" for i in range(len(self.blocks(model)))
                for group in self.input_groups for name in group]


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_SOURCES = (
    ("self_attn.q_proj", "input_layernorm"),
    ("self_attn.o_proj", "self_attn.v_proj"),       # foldable only without grouped-query attention
    ("mlp.gate_proj", "post_attention_layernorm"),
    ("mlp.down_proj", "mlp.up_proj"),
)
_LLAMA_LIKE = Adapter("model.layers", _LLAMA_GROUPS, _LLAMA_SOURCES, tail="mlp")
# Gemma 2/3 put a second norm after attention / MLP: the MLP's input comes from
# pre_feedforward_layernorm, and every RMSNorm scales by (1 + weight).
_GEMMA = Adapter("model.layers", _LLAMA_GROUPS,
                 (("self_attn.q_proj", "input_layernorm"), ("self_attn.o_proj", "self_attn.v_proj"),
                  ("mlp.gate_proj", "pre_feedforward_layernorm"), ("mlp.down_proj", "mlp.up_proj")),
                 norm_offset=1.0)

# model_type (from config.json) -> adapter. SmolLM uses the llama model_type.
ADAPTERS: dict[str, Adapter] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3")},
    **{t: _GEMMA for t in ("gemma2", "gemma3", "gemma3_text")},
}


def check_supported(model_type: str | None) -> None:
    if model_type not in ADAPTERS and model_type not in MOE_LAYOUTS:
        left = "".join(f"; {t} is left out for now ({why})" for t, why in LEFT_OUT.items() if t == model_type)
        raise LLMPressError(
            f"unsupported architecture {model_type!r}; llmpress supports: "
            f"{', '.join(sorted(ADAPTERS))}, and the mixtures of experts {', '.join(sorted(MOE_LAYOUTS))}{left}"
        )


def moe_adapter(config) -> Adapter:
    """Attention as in Llama, then the sparse block: shared-expert and per-expert input groups. No
    AWQ source for the MoE groups: the norm before them also feeds the router, so a scale folded
    into it would change the routing."""
    layout = MOE_LAYOUTS[config.model_type]
    check_uniform_layers(config)
    # the sparse block is the tail: h + moe(norm(h)), its router reading the same input as its experts
    return Adapter("model.layers", _LLAMA_GROUPS[:2] + layout.groups(config), _LLAMA_SOURCES[:2], moe=layout,
                   tail=layout.moe_path)


def adapter_for(model: nn.Module) -> Adapter:
    """The model's adapter. A mixture of experts has its fused experts modules replaced (in place,
    once, sharing the weights' memory) by llmpress.arch.moe.RoutedExperts, so that each expert's
    projections are linears of their own."""
    model_type = getattr(model.config, "model_type", None)
    check_supported(model_type)
    if model_type in MOE_LAYOUTS:
        adapter = moe_adapter(model.config)
        unfuse_experts(model, adapter.blocks(model))
    else:
        adapter = ADAPTERS[model_type]
    blocks = adapter.blocks(model)
    for name in adapter.linear_names(model)[: sum(len(g) for g in adapter.input_groups)]:
        module = model.get_submodule(name)
        if not (isinstance(module, nn.Linear) or hasattr(module, "dense_weight")):
            raise LLMPressError(f"{model.config.model_type}: expected {name} to be a linear layer")
    if len(blocks) == 0:
        raise LLMPressError("model has no decoder blocks")
    return adapter
