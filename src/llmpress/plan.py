"""Plan: ordered (pattern -> config | None) rules; the first rule matching a layer's fqn wins.

Patterns are shell globs over fully qualified module names (`model.layers.*.mlp.*`), or regular
expressions when prefixed with `re:` (`re:.*\\.(q|k|v)_proj`). A rule mapped to None keeps the layer
dense. Resolution against a model gives an explicit {fqn: config} map, and a rule that matches no
layer is an error (llm-compressor silently does nothing in that case; we refuse).
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmpress.config import MethodConfig, config_from_dict
from llmpress.errors import LLMPressError

PLAN_VERSION = 1


def _matches(pattern: str, fqn: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    return fnmatch.fnmatchcase(fqn, pattern)


@dataclass
class Plan:
    rules: list[tuple[str, MethodConfig | None]] = field(default_factory=list)

    @classmethod
    def uniform(cls, config: MethodConfig) -> "Plan":
        """Every compressible linear of every decoder block gets `config`."""
        return cls([("*", config)])

    def resolve(self, fqns: list[str]) -> dict[str, MethodConfig]:
        """{fqn: config} for the layers that get compressed (dense ones are left out)."""
        if not self.rules:
            raise LLMPressError("the plan has no rules")
        used = [False] * len(self.rules)
        out: dict[str, MethodConfig] = {}
        for fqn in fqns:
            for i, (pattern, config) in enumerate(self.rules):
                if _matches(pattern, fqn):
                    used[i] = True
                    if config is not None:
                        out[fqn] = config
                    break
        # A rule shadowed by an earlier one also counts as matching nothing: report it.
        unused = [self.rules[i][0] for i, u in enumerate(used) if not u]
        if unused:
            example = fqns[0] if fqns else "(none)"
            raise LLMPressError(
                f"plan rule(s) {unused} match no compressible layer (before earlier rules took them); "
                f"layer names look like {example!r}"
            )
        return out

    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "rules": [{"pattern": p, "config": None if c is None else c.to_dict()} for p, c in self.rules],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise LLMPressError(f"plan version {d.get('version')} is not supported")
        try:
            rules = [(r["pattern"], None if r["config"] is None else config_from_dict(r["config"])) for r in d["rules"]]
        except (KeyError, TypeError) as e:
            raise LLMPressError(f"malformed plan: {e!r}; expected {{'rules': [{{'pattern': ..., 'config': ...}}]}}")
        return cls(rules)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise LLMPressError(f"cannot read plan {path}: {e}")


# llama-quantize's own substitutes for tensors whose rows are not whole 256-weight blocks
# (llama_tensor_get_type's fallback, as the llama.cpp build of ../shared/tools does it)
LLAMACPP_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
                     "iq4_xs": "iq4_nl", "iq3_s": "iq4_nl", "iq3_xxs": "iq4_nl", "iq2_s": "iq4_nl",
                     "iq2_xs": "iq4_nl", "iq2_xxs": "iq4_nl"}
UNIFORM_GGUF = {"q4_0": 4, "q5_0": 5, "q8_0": 8}       # the symmetric group-32 grids: bits=b, group_size=32


def check_gguf_fallback(fallback: str) -> None:
    """Refuse, before any work, a fallback that is not a grid every row of 32-multiple length takes."""
    from llmpress.methods.ggml_grid import TYPES
    ok = ["llama.cpp", *UNIFORM_GGUF, *(k for k, t in TYPES.items() if t.block == 32)]
    if str(fallback).lower() not in [o.lower() for o in ok]:
        raise LLMPressError(f"--gguf-fallback must be one of {', '.join(ok)} (a grid of 32-weight blocks), got {fallback!r}")


def with_gguf_fallback(layer_configs: dict[str, MethodConfig], shapes: dict[str, tuple[int, int]],
                       fallback: str = "llama.cpp") -> tuple[dict[str, MethodConfig], dict[str, dict]]:
    """Give the layers whose rows a config's GGUF grid cannot take (gguf=q3_k on 576 inputs) the same
    method on a declared fallback grid: fallback="llama.cpp" uses llama-quantize's own substitute
    (LLAMACPP_FALLBACK: Q3_K -> Q4_0, IQ4_XS -> IQ4_NL ...), or a type name (q4_0, q5_0, q8_0,
    iq4_nl, q4_1, q5_1: the 32-weight-block grids) for all of them. shapes: {fqn: (out, in)}.
    Returns (configs, {fqn: {"from", "to", "reason"}}) so the substitution is reported, never silent;
    a fallback that does not fit either is left for the pipeline to refuse."""
    import dataclasses
    out, changed = dict(layer_configs), {}
    for fqn, config in layer_configs.items():
        gguf = getattr(config, "gguf", None)
        why = config.shape_problem(*shapes[fqn]) if gguf else None
        if why is None:
            continue
        target = LLAMACPP_FALLBACK.get(gguf) if fallback == "llama.cpp" else str(fallback).lower()
        if target is None:
            raise LLMPressError(f"{fqn}: {why}, and llama.cpp declares no fallback for {gguf}")
        clip = {"clip": None} if target.startswith("iq") and getattr(config, "clip", None) else {}
        if target in UNIFORM_GGUF:
            new = dataclasses.replace(config, gguf=None, bits=UNIFORM_GGUF[target], group_size=32, symmetric=True)
        else:
            fields = type(config).__dataclass_fields__             # bits / group size / symmetric: the grid's
            implied = {k: fields[k].default for k in ("bits", "group_size", "symmetric") if k in fields}
            new = dataclasses.replace(config, gguf=target, **implied, **clip)
        out[fqn] = new
        changed[fqn] = {"from": gguf, "to": target, "reason": why}
    return out, changed
