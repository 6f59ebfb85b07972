"""A recipe: every model-independent option of a compress run, as plain data (JSON or YAML).

Fields are the `compress` options (their names with '_' for '-': target, budget, menu, allocator,
calib, num_samples, rotate, online_hadamard, sequential, method, bits, ...), read from the CLI's own
parser so the two cannot drift; the model, the output folder and the machine (--device, --offload,
--resume, --overwrite, --json, --trust-remote-code) are not recipe fields. Precedence, lowest
first: the option defaults; the target's default recipe for a `--budget` run that names no menu
(llmpress.targets.DEFAULTS); the recipe file or preset; the flags given on the command line.
Unknown fields and values of the wrong kind are refused before any work.

Every output's manifest records the resolved recipe in full (`recipe`), so
`llmpress compress --recipe OUT/llmpress.json --model M --out OUT2` runs the same options again
(bit for bit on the CPU: the calibration windows, seeds and solvers are deterministic there).

Python: `llmpress.recipe.compress("smollm2-135m", "out", recipe="gguf-4bit", num_samples=32)` is the
same call the CLI makes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmpress.errors import LLMPressError

# not recipe fields: where the model comes from and goes, and this machine's settings
MACHINE = {"model", "out", "overwrite", "json", "trust_remote_code", "resume", "offload", "device", "recipe",
           "command", "plan_out"}

# The bench's best recipes by name (bench/README.md has the measurements behind each).
PRESETS: dict[str, dict] = {
    # "Quality at 3 bits and below": 27.9 at 3.0 bits with the finer menu of bench/low_bits.py
    "llmpress-3bit": {"target": "llmpress", "budget": "bits=3"},
    # GPTQ on llama.cpp's grids; 4.5 bits: rows 576 wide take only 32-block types (Q4_0 / IQ4_NL)
    "gguf-4bit": {"target": "llama.cpp", "budget": "bits=4.5"},
    # compressed-tensors W4A16 groups (+ 8-bit per channel where the table says it pays), fused layers alike
    "vllm-4bit": {"target": "vllm", "budget": "bits=4.5"},
}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in MACHINE and a.dest != "help"}


def _subparser(command: str) -> argparse.ArgumentParser:
    """A fresh parser of the CLI's `command` (compress or plan)."""
    from llmpress.cli import _parser
    return next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def load(spec: str) -> dict:
    """A preset name, a JSON / YAML recipe file, or an llmpress output's manifest (its `recipe`)."""
    if spec in PRESETS:
        return dict(PRESETS[spec])
    path = Path(spec)
    if path.is_dir() and (path / "llmpress.json").is_file():
        path = path / "llmpress.json"
    if not path.is_file():
        raise LLMPressError(f"--recipe {spec!r}: no such file and no such preset ({', '.join(sorted(PRESETS))})")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:            # json.JSONDecodeError, yaml.YAMLError: one clear line
        raise LLMPressError(f"--recipe {path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} ({e})")
    if isinstance(data, dict) and "format_version" in data:          # an llmpress manifest
        if not isinstance(data.get("recipe"), dict):
            raise LLMPressError(f"{path} records no recipe (made by an llmpress older than recipes)")
        data = data["recipe"]
    if not isinstance(data, dict):
        raise LLMPressError(f"--recipe {path}: a recipe is a mapping of compress options")
    return data


def validate(fields: dict, actions: dict[str, argparse.Action], where: str) -> dict:
    """Refuse unknown fields and values that the option would not take; '-' in names become '_'."""
    out = {}
    for key, value in fields.items():
        name = key.replace("-", "_")
        if name not in actions:
            hint = " (a machine setting: give it as a flag)" if name in MACHINE else ""
            raise LLMPressError(f"{where}: unknown field {key!r}{hint}; recipe fields: {', '.join(sorted(actions))}")
        a = actions[name]
        if value is not None:
            if isinstance(a, argparse._StoreTrueAction):
                ok = isinstance(value, bool)
            elif name == "plan":
                ok = isinstance(value, (str, dict))          # a Plan file or the Plan itself
            elif a.type is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif a.type is not None and a.type is not str:     # float, int-or-float
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise LLMPressError(f"{where}: {key} = {value!r} is not what --{name.replace('_', '-')} takes")
            if a.choices is not None and value not in a.choices:
                raise LLMPressError(f"{where}: {key} = {value!r}; choose from {', '.join(map(str, a.choices))}")
        out[name] = value
    return out


def resolve(given: dict, recipe: str | dict | None, actions: dict[str, argparse.Action]) -> dict:
    """The full recipe: defaults < target defaults < recipe < `given` (the options set explicitly)."""
    from llmpress.targets import check_target, default_recipe
    from_file = validate(load(recipe) if isinstance(recipe, str) else dict(recipe or {}), actions,
                         f"recipe {recipe}" if isinstance(recipe, str) else "recipe")
    given = validate(given, actions, "options")
    merged = {name: a.default for name, a in actions.items()}
    merged.update(from_file)
    merged.update(given)
    target = check_target(merged["target"])
    if merged.get("budget") and "menu" not in from_file and "menu" not in given:
        from llmpress.budget import Budget
        for name, value in default_recipe(target, Budget.parse(merged["budget"]).metric).items():
            if name not in from_file and name not in given:
                merged[name] = value
    if isinstance(merged.get("plan"), str):            # recorded as data: the recipe then stands alone
        from llmpress.plan import Plan
        merged["plan"] = Plan.load(merged["plan"]).to_dict()
    return merged


def explicit_options(argv: list[str], command: str) -> dict:
    """The compress / plan options that `argv` sets itself (not their defaults)."""
    from llmpress.cli import _parser
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for a in sub._actions:                 # the whole parser parses argv; only this subcommand's defaults go
        a.default = argparse.SUPPRESS
    ns = parser.parse_args(argv)
    return {k: v for k, v in vars(ns).items() if k not in MACHINE}


def namespace(model: str, out: str | None, recipe: str | dict | None = None, command: str = "compress",
              machine: dict | None = None, **options) -> argparse.Namespace:
    """The argument namespace `compress` runs on: the resolved recipe plus the machine settings."""
    sub = _subparser(command)
    actions = _actions(sub)
    fields = resolve(options, recipe, actions)
    ns = argparse.Namespace(offload=None, resume=False, overwrite=False, json=None, out=None, plan_out=None,
                            trust_remote_code=False, device="cpu")   # what `plan` has no option for
    ns.__dict__.update({a.dest: a.default for a in sub._actions if a.dest != "help"})
    ns.__dict__.update(fields)
    ns.__dict__.update(machine or {})
    ns.model, ns.command, ns.recipe_fields = model, command, fields
    if out is not None:
        ns.out = out
    return ns


def compress(model: str, out: str, recipe: str | dict | None = None, *, overwrite: bool = False,
             device: str = "cpu", **options) -> dict:
    """Compress `model` into `out` with a recipe (a preset, a file or a dict) and option overrides
    (compress option names: budget="bits=4", num_samples=32, ...); returns the run's results."""
    from llmpress.cli import cmd_compress
    return cmd_compress(namespace(model, out, recipe, machine={"overwrite": overwrite, "device": device}, **options))
