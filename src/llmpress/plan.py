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
