"""Where the compressed model will run: what each runtime can serve, its default recipe, its export.

`compress --target T` makes the output run in T, packed, without custom code:
- llmpress: everything llmpress builds (its own runtime; the llmpress folder is the output);
- llama.cpp: GGUF block types only (a GGUF grid solved in place, or a symmetric 4/5/8-bit layer
  with groups of 32, which IS Q4_0 / Q5_0 / Q8_0: llmpress.gguf_export), rotations that fold into
  the weights only (llama.cpp has no online Hadamard); `OUT/model.gguf` is written at the end;
- vllm: compressed-tensors pack-quantized 4- and 8-bit symmetric layers, per channel or groups of
  32 / 64 / 128 (the weight-only schemes vLLM's kernels take), and the layers vLLM fuses into one
  matmul (q/k/v, gate/up, and the experts of one MoE layer) on one scheme;
  `OUT/compressed-tensors/` is written at the end;
- transformers: what its compressed-tensors loader reads (symmetric 2-8-bit integer grids whose
  group divides the inputs); `OUT/compressed-tensors/` is written at the end.
Anything else on such a target would be written dense by the export (no saving) or not load: a
plan that holds it is refused before any work, naming the layers and the reason
(`target_problems`). Structural changes that give a standard config (dropped blocks, a narrower
MLP, fewer experts) run everywhere.

Each target's default recipe for `--budget` (used when no menu is given) is the best measured in
bench/README.md for what that runtime serves; see DEFAULTS.
"""
from __future__ import annotations

import re

from llmpress.config import MethodConfig
from llmpress.errors import LLMPressError

TARGETS = ("llmpress", "llama.cpp", "vllm", "transformers")

# the quantizers whose modules are plain integer grids (llmpress.modules.QuantLinear / GGMLLinear)
_GRID_METHODS = ("rtn", "gptq", "awq")
_GGUF_BLOCK = 32                        # Q4_0 / Q5_0 / Q8_0: 32 weights per block, one fp16 scale
_GGUF_BITS = (4, 5, 8)
_VLLM_GROUPS = (0, 32, 64, 128)         # 0: per channel

_K = "clip=search"                      # the K-quant scale search (bench: 0.48-0.81x llama.cpp's layer error)
_LLAMA_CPP_MENU = ";".join([f"gptq:gguf={t},{_K}" for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")] +
                           [f"gptq:gguf={t}" for t in ("iq3_xxs", "iq3_s", "iq4_xs", "iq4_nl")] +
                           [f"gptq:bits=4,group_size=32,{_K}", "gptq:bits=5,group_size=32",
                            "gptq:bits=8,group_size=32"])

# Per target, per budget metric: the recipe fields a `--budget` run takes when it names no menu.
# None: that budget has nothing this runtime can serve (refused with the reason).
DEFAULTS: dict[str, dict[str, dict | None]] = {
    # bench/README.md "Quality at 3 bits and below": 27.9 at 3.0 bits, 26.3 at 3.25 (finer menu);
    # this five-entry menu is the README's recipe
    "llmpress": {
        "bits": {"menu": "gptq:group_size=0,symmetric=false,clip=mse;gptq:group_size=64,symmetric=false,clip=mse;"
                         "gptq-lut:bits=2;gptq-lut:bits=3;gptq-vq",
                 "rotate": "hadamard", "online_hadamard": "mlp.down_proj,self_attn.o_proj",
                 "sequential": True, "reference": 0.25},
        "params": {"menu": "sparsegpt,svd-llm"},     # bench/README.md "Allocation": params=0.5
    },
    # bench/README.md "llmpress's GGUF vs llama.cpp's own imatrix quantizer": GPTQ on llama.cpp's
    # grids (clip=search on the K-quants); 32-block types for rows that are not whole 256-blocks
    # the estimated table (bench/README.md "Estimated sensitivity"): 458 s against about 4,400 s measured for
    # these 12 options on the 135M model, its plan 22.01 against 21.88 (+0.6 %)
    "llama.cpp": {"bits": {"menu": _LLAMA_CPP_MENU, "estimate_sensitivity": True}, "params": None},
    # groups of 128 (llm-compressor's W4A16 default) are left out: they do not divide 576- or
    # 1536-wide rows, and the format has no shorter last group
    "vllm": {"bits": {"menu": "gptq:bits=4,group_size=0,clip=mse;gptq:bits=4,group_size=64,clip=mse;"
                              "gptq:bits=4,group_size=32,clip=mse;gptq:bits=8,group_size=0"},
             "params": None},
    "transformers": {"bits": {"menu": "gptq:group_size=0,clip=mse;gptq:group_size=64,clip=mse;"
                                      "gptq:group_size=32,clip=mse"},
                     "params": None},
}
EXPORT = {"llama.cpp": ("gguf", "model.gguf"), "vllm": ("compressed-tensors", "compressed-tensors"),
          "transformers": ("compressed-tensors", "compressed-tensors")}


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise LLMPressError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    return target


def default_recipe(target: str, metric: str) -> dict:
    """The recipe fields of `target`'s default for a `metric` budget (bytes budgets as bits)."""
    fields = DEFAULTS[check_target(target)]["params" if metric == "params" else "bits"]
    if fields is None:
        raise LLMPressError(f"a {metric} budget prunes or factors layers, which {target} cannot serve packed; "
                            f"use --target llmpress, or a bits / bytes budget")
    return dict(fields)


def option_problem(target: str, config: MethodConfig | None, out_f: int, in_f: int) -> str | None:
    """Why `target` cannot serve an (out_f, in_f) layer compressed with `config` packed, or None."""
    if config is None or target == "llmpress":
        return None
    name = config.method
    if name not in _GRID_METHODS:
        return f"{name} ({config.family}) has no {target} format: it would be written dense"
    gguf = getattr(config, "gguf", None)
    if target == "llama.cpp":
        if gguf:
            return None
        if not config.symmetric or config.group_size != _GGUF_BLOCK or config.bits not in _GGUF_BITS:
            return (f"{config.label()} is no GGUF type (GGUF stores symmetric {'/'.join(map(str, _GGUF_BITS))}-bit "
                    f"groups of {_GGUF_BLOCK} or a gguf= grid): it would be written F32")
        return None if in_f % _GGUF_BLOCK == 0 else f"{in_f} inputs are not whole {_GGUF_BLOCK}-weight blocks"
    if gguf:
        return f"GGUF grid {gguf} has no compressed-tensors form"
    if not config.symmetric:
        return "asymmetric zero points (transformers does not load them)"
    group = 0 if config.group_size == 0 or config.group_size >= in_f else config.group_size    # >= in_f: one group
    if group and in_f % group:
        return f"group size {group} does not divide its {in_f} inputs"
    if target == "vllm":
        if config.bits not in (4, 8):
            return f"{config.bits}-bit weights (vLLM's weight-only kernels take 4 and 8 bits)"
        if group not in _VLLM_GROUPS:
            return f"group size {group} (vLLM's kernels take per channel or 32 / 64 / 128)"
    return None


def fused_sets(names: list[str], target: str = "vllm") -> list[list[str]]:
    """Layers that must share one scheme on `target`. vLLM fuses into one matmul q/k/v and gate/up
    of a block, and every expert of one MoE layer (all its expert projections: one fused kernel);
    llama.cpp stacks each projection of a layer's experts into one tensor of one type
    (`ffn_{gate,up,down}_exps`). Other targets: as vLLM (what `--fuse` asks for)."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        if (m := re.match(r"(.*\.experts)\.\d+\.(\w+)$", n)):
            key = (m.group(1), m.group(2) if target == "llama.cpp" else "experts")
        elif target == "llama.cpp":
            continue
        elif (m := re.match(r"(.*)\.(q_proj|k_proj|v_proj)$", n)):
            key = (m.group(1), "qkv")
        elif (m := re.match(r"(.*)\.(gate_proj|up_proj)$", n)):
            key = (m.group(1), "gate_up")
        else:
            continue
        groups.setdefault(key, []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def target_problems(target: str, layer_configs: dict[str, MethodConfig | None],
                    shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Every reason `target` cannot serve this per-layer assignment, one line per layer (or group)."""
    out = [f"{n}: {why}" for n, c in layer_configs.items()
           if (why := option_problem(target, c, *shapes[n])) is not None]
    if target in ("vllm", "llama.cpp"):
        why = ("vLLM fuses these into one matmul, they need one scheme" if target == "vllm" else
               "llama.cpp stacks these experts into one tensor (ffn_*_exps), they need one type")
        for group in fused_sets(list(layer_configs), target):
            labels = {layer_configs[n].label() if layer_configs[n] else "dense" for n in group}
            if len(labels) > 1:
                out.append(f"{', '.join(group)}: {why} (got {', '.join(sorted(labels))})")
    return out


def refuse_problems(target: str, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LLMPressError(f"--target {target} cannot serve this plan: " + "; ".join(problems[:5]) + more +
                            ". Re-plan those layers, or use --target llmpress")


def check_menu(target: str, menu: list[MethodConfig], shapes: set[tuple[int, int]]) -> None:
    """Refuse, before the sensitivity table, a menu entry the target cannot serve on a layer shape
    that the entry can compress (an entry that cannot compress a shape at all, such as a 256-weight
    GGUF block on 576 inputs, is left out for those layers by the allocator)."""
    bad = []
    for c in menu:
        for o, i in sorted(shapes):
            if c.shape_problem(o, i) is None and (why := option_problem(target, c, o, i)) is not None:
                bad.append(f"{c.label()} on ({o}, {i}) layers: {why}")
                break
    if bad:
        raise LLMPressError(f"--target {target}: the menu holds what it cannot serve: " + "; ".join(bad[:4]) +
                            (f" (and {len(bad) - 4} more)" if len(bad) > 4 else "") + "; leave those entries out")


def check_extras(target: str, fields: dict) -> None:
    """Options other than the plan that the target cannot carry."""
    if target == "llmpress":
        return
    bad = []
    if fields.get("online_hadamard"):
        bad.append("--online-hadamard (a rotation at run time: no such op in GGUF or compressed-tensors)")
    if fields.get("share_basis") is not None:
        bad.append("--share-basis (shared low-rank factors)")
    if fields.get("recover") is not None:
        bad.append("--recover (LoRA adapters beside the quantized layers; llmpress's runtime serves them)")
    if bad:
        raise LLMPressError(f"--target {target} cannot carry: " + "; ".join(bad))
