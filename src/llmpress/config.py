"""Method configs: one frozen dataclass per method, mapped to its handler by `register`.

A config is plain data (JSON round-trip, versioned); the handler turns (nn.Linear, config, stats)
into a compressed module. The pipeline only ever sees this registry, never a method's internals.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from llmpress.errors import LLMPressError

CONFIG_VERSION = 1

# method name -> (config class, handler). Filled by @register at import of llmpress.methods.
_REGISTRY: dict[str, tuple[type["MethodConfig"], Callable]] = {}
# method name -> group transform, run on a whole input group before the per-layer handlers (AWQ).
_GROUP_TRANSFORMS: dict[str, Callable] = {}
# method name -> group solver, solving every member of an input group in one call (GPTQ).
_GROUP_SOLVERS: dict[str, Callable] = {}


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses set `method` (its name) and `stat`: the calibration
    statistic the handler needs: None for data-free methods, "norms" for per-input-channel norms and
    mean magnitudes, "hessian" for those plus the input Gram matrix X^T X (see llmpress.stats)."""

    method: ClassVar[str] = ""
    family: ClassVar[str] = ""        # quantization | pruning | low-rank
    stat: ClassVar[str | None] = None
    # the settings this method contributes to an allocator's menu (llmpress.budget.menu_configs)
    menu: ClassVar[tuple[dict, ...]] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden: raise LLMPressError on bad settings
        pass

    def shape_problem(self, out_features: int, in_features: int) -> str | None:  # overridden
        """Why this config cannot compress an (out, in) layer (e.g. a GGUF block grid on rows that
        are not a whole number of blocks), or None. The pipeline refuses such a plan before any
        work; allocators leave the option out for that layer."""
        return None

    def rows_independent(self) -> bool:  # overridden
        """True when each output row's result depends only on that row's weights and the shared
        statistics (no decision across rows): compressing a subset of the rows then gives exactly
        those rows of the whole layer's result, which the sensitivity estimate relies on
        (llmpress.budget, estimate=True). Tested per method in tests/test_budget.py."""
        return False

    def storage(self, out_features: int, in_features: int) -> tuple[int, int]:
        """(bytes as stored, parameters kept) of one (out, in) layer under this config: exactly what
        its compressed module stores (llmpress.modules), so allocators and exports count alike."""
        raise LLMPressError(f"method {self.method!r} states no storage cost")

    @classmethod
    def menu_levels(cls) -> list["MethodConfig"]:
        return [cls(**kw) for kw in cls.menu]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    def label(self) -> str:
        """Short human label, e.g. `rtn:bits=4,group_size=128`."""
        args = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v is not None)
        return f"{self.method}:{args}" if args else self.method


def register(config_cls: type[MethodConfig], group_transform: Callable | None = None,
             group_solver: Callable | None = None) -> Callable[[Callable], Callable]:
    """Decorator: `@register(RTN)` over `def apply(linear, config, stats) -> (module, info)`.

    `group_transform(block, adapter, head, members, configs, stats) -> info` (optional) runs once per
    input group whose members all use this method, before their handlers: an equivalence transform
    across layers, such as AWQ's scales folded into the preceding norm.
    `group_solver(linears, config, stats) -> [(module, info)]` (optional) replaces the handler for an
    input group whose members share one config: the same result, computed in one call (GPTQ's rows
    are independent given the shared Hessian, so q/k/v are solved as one stacked matrix)."""

    def wrap(handler: Callable) -> Callable:
        if config_cls.method in _REGISTRY:
            raise ValueError(f"method {config_cls.method!r} registered twice")
        _REGISTRY[config_cls.method] = (config_cls, handler)
        if group_transform is not None:
            _GROUP_TRANSFORMS[config_cls.method] = group_transform
        if group_solver is not None:
            _GROUP_SOLVERS[config_cls.method] = group_solver
        return handler

    return wrap


def group_transform_for(config: MethodConfig) -> Callable | None:
    return _GROUP_TRANSFORMS.get(config.method)


def group_solver_for(config: MethodConfig) -> Callable | None:
    solver = _GROUP_SOLVERS.get(config.method)
    if solver is None:
        return None

    def solve(linears, config, stats):
        from llmpress.rotate import carry_online
        return [(carry_online(lin, m), info) for lin, (m, info) in zip(linears, solver(linears, config, stats))]
    return solve


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def config_class(name: str) -> type[MethodConfig]:
    if name not in _REGISTRY:
        raise LLMPressError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _REGISTRY[name][0]


def handler_for(config: MethodConfig) -> Callable:
    """The method's `apply(linear, config, stats) -> (module, info)`; the module keeps the linear's
    online rotation (llmpress.rotate.rotate_online), if it has one."""
    handler = _REGISTRY[config.method][1]

    def apply(linear, config, stats):
        from llmpress.rotate import carry_online
        module, info = handler(linear, config, stats)
        return carry_online(linear, module), info
    return apply


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    d = dict(d)
    name = d.pop("method", None)
    version = d.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise LLMPressError(f"config version {version} is not supported (this llmpress reads {CONFIG_VERSION})")
    cls = config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise LLMPressError(f"method {name!r} has no option(s) {sorted(unknown)}; options: {sorted(fields)}")
    return cls(**d)


def parse_method_spec(spec: str) -> MethodConfig:
    """`"rtn:bits=4,group_size=128"` -> RTN(bits=4, group_size=128). Values parsed as int, float,
    bool or str; `nm=2:4` stays a string."""
    name, _, args = spec.strip().partition(":")
    return config_from_dict({"method": name, **parse_options(args, spec)})


def parse_options(args: str, spec: str | None = None) -> dict[str, Any]:
    """`"bits=4,group_size=128"` -> {"bits": 4, "group_size": 128} (names with - read as _)."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise LLMPressError(f"bad option {item!r} in {spec or args!r}: expected key=value")
        kwargs[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return kwargs


def _parse_value(v: str) -> Any:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
