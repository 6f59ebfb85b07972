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

The options are defined here (`add_options`), and the CLI builds its `compress` / `plan` parsers
from them; a `Recipe` is the resolved fields as one immutable object, the input of
`llmpress.workflow.compress` / `plan` (what the CLI, Python users and bench/ all call):

    from llmpress import Recipe
    from llmpress.workflow import compress
    compress("smollm2-135m", "out", Recipe.resolve("gguf-4bit", num_samples=32))
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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


def number(text: str) -> int | float:
    """An int when the value is whole ("3"), else a float ("2.5")."""
    value = float(text)
    return int(value) if value.is_integer() else value


def add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (a GPU when there is one); default cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype of the model (auto: the checkpoint's own; GGUF dequantizes to float32)")



def add_options(c: argparse.ArgumentParser, planning: bool) -> None:
    """The options of `compress` (and of `plan`, which stops after the allocation: no --out)."""
    from llmpress.targets import TARGETS
    c.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, llmpress folder or smollm2-135m")
    c.add_argument("--target", default="llmpress", choices=TARGETS,
                   help="where the model will run: the --budget default recipe, what the plan may hold and the "
                        "export written at the end follow from it (default llmpress: everything)")
    c.add_argument("--recipe", metavar="FILE|PRESET",
                   help="a recipe (JSON or YAML of compress options; an output's llmpress.json re-runs its recipe) "
                        "or a preset (" + ", ".join(sorted(PRESETS)) + "); flags given here override its fields")
    c.add_argument("--method", help="method name (see --plan for per-layer choices)")
    c.add_argument("--plan", help="Plan JSON file (instead of --method)")
    c.add_argument("--bits", type=number, help="bits per weight (gptq-vq: a multiple of 1/dim, e.g. 2.5)")
    c.add_argument("--group-size", type=int)
    c.add_argument("--terms", type=int, help="series: low-bit terms in the expansion (each quantizes the residual)")
    c.add_argument("--asymmetric", action="store_true", help="asymmetric quantization grid (zero points)")
    c.add_argument("--sparsity", type=float)
    c.add_argument("--nm", help="N:M structured sparsity, e.g. 2:4")
    c.add_argument("--param-ratio", type=float)
    c.add_argument("--rank", type=int, help="gptq-lr: rank of the low-rank correction")
    c.add_argument("--dim", type=int, help="gptq-vq: weights per vector (default 2)")
    c.add_argument("--rows", type=int, help="gptq-vq: rows sharing one codebook (default 256)")
    c.add_argument("--clip", choices=["mse", "search"],
                   help="RTN / GPTQ / AWQ: mse: search each group's clipping range; search: llama.cpp's "
                        "importance-weighted signed scale search (symmetric grids: all 2^b levels used)")
    c.add_argument("--gguf-type", choices=["q4_1", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs",
                                                  "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"],
                   help="RTN / AWQ / GPTQ: quantize onto this llama.cpp block grid (fixes bits and group size; "
                        "--format gguf then writes these bytes as they are)")
    c.add_argument("--gguf-fallback", metavar="llama.cpp|TYPE",
                   help="layers whose rows a GGUF grid of the plan cannot take (not whole 256-weight blocks) get "
                        "the same method on this 32-block grid instead (llama.cpp: llama-quantize's own choice, "
                        "e.g. Q3_K -> Q4_0, IQ4_XS -> IQ4_NL); reported. Without it such a plan is refused")
    c.add_argument("--rotate", choices=["hadamard", "random"],
                   help="fold an orthogonal rotation of the residual stream (and per-head v/o) into the weights "
                        "before compressing (QuaRot-style incoherence; the model's function is unchanged)")
    c.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation's random signs / matrix")
    c.add_argument("--rotate-search", type=int, metavar="N",
                   help="try N seeds from --rotate-seed on and keep the one with the smallest measured quantization "
                        "output error (3-bit per-channel RTN over every layer, on the calibration data)")
    c.add_argument("--online-hadamard", metavar="LAYERS",
                   help="comma-separated block linears (e.g. mlp.down_proj,self_attn.o_proj) that get a Hadamard "
                        "rotation of their input at run time (QuaRot's R4): incoherent weights for the quantizer, at the "
                        "cost of a runtime op (about half a float32 down_proj here); such layers export dense to "
                        "compressed-tensors / GGUF")
    c.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing Hessian diagonal")
    c.add_argument("--damp", type=float, help="GPTQ / SparseGPT: relative Hessian damping (default 0.01)")
    c.add_argument("--refine", type=int, metavar="SWEEPS",
                   help="GPTQ: coordinate-descent sweeps over the columns after the GPTQ pass (QuantEase; same grid, "
                        "never a higher layer error; about as costly per sweep as GPTQ itself)")
    c.add_argument("--refit", type=int, metavar="ROUNDS",
                   help="GPTQ (uniform grids): re-fit every group's scale jointly to the chosen codes in the Hessian "
                        "metric, then sweep again on those scales, ROUNDS times at most (kept while the error falls)")
    c.add_argument("--alpha", type=float, help="ASVD: activation scaling exponent (default 0.5)")
    c.add_argument("--calib", default="wikipedia", help="calibration source: wikipedia, c4, wikitext2-train or a file")
    c.add_argument("--num-samples", type=int, default=128)
    c.add_argument("--seq-len", type=int, default=2048, help="calibration window length")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--budget", help="one global budget: params=F (fraction kept), bits=F (average) or bytes=N")
    c.add_argument("--menu", help="methods the allocator may mix, e.g. gptq,sparsegpt,svd-llm "
                                  "(default: sparsegpt,svd-llm for params, gptq,sparsegpt,svd-llm otherwise)")
    c.add_argument("--allocator", default="knapsack", choices=["knapsack", "lagrange", "search", "refine"],
                   help="knapsack / lagrange: from the sensitivity table alone (seconds); search: random "
                        "moves kept when the loss falls; refine: the knapsack choice re-solved on in-context "
                        "KLs measured for every layer's neighbouring options (minutes per round)")
    c.add_argument("--sensitivity", help="sensitivity table JSON: read if it exists for this model, data and "
                                         "menu; written otherwise (default: under $LLMPRESS_CACHE or ~/.cache/llmpress)")
    c.add_argument("--estimate-sensitivity", action=argparse.BooleanOptionalAction, default=False,
                   help="measure each layer's cheapest menu option in full and estimate the others from their own "
                        "layer error (solved on 1/8 of the rows where a method's rows are independent) times that "
                        "option's ratio of loss to layer error: a table in a fraction of the time (bench/README.md "
                        "\"Estimated sensitivity\"; the llama.cpp target's default, --no-estimate-sensitivity to measure)")
    c.add_argument("--sample-windows", type=int, help="calibration windows the sensitivity is measured on "
                                                         "(default: 16, or all when there are fewer)")
    c.add_argument("--fuse", action="store_true",
                   help="layers that serving engines fuse (q/k/v, gate/up) share one choice (knapsack, lagrange)")
    c.add_argument("--search-steps", type=int, default=40)
    c.add_argument("--refine-rounds", type=int, default=1)
    c.add_argument("--one-pass", action="store_true",
                   help="statistics from the dense model in one forward per block (faster, no error propagation)")
    c.add_argument("--stats-cache", help="folder caching one-pass statistics for reuse (implies --one-pass)")
    c.add_argument("--sequential", action="store_true",
                   help="measure each input group of a block (q/k/v, o, gate/up, down) after the groups before it "
                        "were compressed (the GPTQ code's true-sequential; a partial forward per group)")
    c.add_argument("--reference", type=float, default=0.0, metavar="ALPHA",
                   help="asymmetric calibration (GPTAQ): fit Gram-matrix methods (gptq, sparsegpt, awq, gptq-lr, "
                        "svd-llm) this share of the way to the UNCOMPRESSED model's outputs, through a second "
                        "stream of hidden states (GPTAQ's code: 0.25; 0 = off)")
    c.add_argument("--tune", type=int, default=0, metavar="EPOCHS",
                   help="after each block is quantized, fit its quantized layers' scales and its norm weights to the "
                        "uncompressed block's outputs by gradient descent for EPOCHS passes over the calibration "
                        "windows (OmniQuant / Norm Tweaking; codes and format unchanged; 0 = off)")
    c.add_argument("--recover", type=int, metavar="STEPS",
                   help="after compressing, fine-tune the low-rank adapters (apiq, gptq-lr, oats layers) end to end for "
                        "STEPS AdamW steps of next-token loss on the calibration windows, every other weight frozen "
                        "(QLoRA / ApiQ's fine-tuning; 1/8 of the windows held out to check it helped)")
    c.add_argument("--recover-lr", type=float, default=3e-4, help="learning rate of --recover (ApiQ's: 3e-4)")
    c.add_argument("--recover-batch", type=int, default=4, help="windows per --recover step")
    c.add_argument("--prune-experts", type=float, metavar="SHARE",
                   help="mixtures of experts: before compressing, remove this share of every layer's routed experts, "
                        "the lowest by --expert-criterion on the calibration tokens (a standard config with fewer experts)")
    c.add_argument("--merge-experts", type=float, metavar="SHARE",
                   help="mixtures of experts: before compressing, merge this share of every layer's routed experts "
                        "into the others (MC-SMoE: the most routed lead, the rest join the one of most similar router "
                        "logits, neurons aligned, frequency-weighted average; a standard config with fewer experts)")
    c.add_argument("--expert-criterion", default="reap", choices=["reap", "frequency"],
                   help="expert pruning score: reap (mean router weight x expert output norm over routed tokens, "
                        "REAP) or frequency (routed token count)")
    c.add_argument("--drop-blocks", type=int, metavar="N",
                   help="before compressing, remove N whole decoder blocks chosen by --block-criterion on the "
                        "calibration tokens (a standard config with fewer layers; alone, without a method, too)")
    c.add_argument("--block-criterion", default="bi", choices=["bi", "angular", "ppl"],
                   help="which blocks to drop: bi (ShortGPT's 1 - cos(input, output), the N lowest), angular (the "
                        "contiguous N blocks of least angular distance, Gromov et al.), ppl (greedy, least calibration "
                        "perplexity after each removal, BlockPruner's search; about N x L^2 / 2 block forwards)")
    c.add_argument("--prune-width", type=float, metavar="SHARE",
                   help="before compressing, remove this share of every MLP's intermediate neurons (same count in "
                        "every block: a standard config with a smaller intermediate_size), down_proj refit by least squares")
    c.add_argument("--width-criterion", default="obs", choices=["obs", "wanda"],
                   help="which neurons go: obs (structured Optimal Brain Surgeon on down_proj's columns) or wanda "
                        "(||W_:,j||^2 x E[h_j^2]); both refit down_proj on the kept neurons")
    c.add_argument("--width-multiple", type=int, default=64, metavar="M",
                   help="the kept intermediate size is rounded to a multiple of M (256 for llama.cpp's K-quant "
                        "rows of down_proj)")
    c.add_argument("--share-basis", type=int, metavar="N",
                   help="Basis Sharing (Wang et al., ICLR 2025): compress every block linear by low rank, q/k/v/gate/up "
                        "with one whitened-SVD basis per projection shared by N consecutive blocks (stored once), "
                        "o/down with their own (SVD-LLM); alone, without a method")
    c.add_argument("--share-search", action="store_true",
                   help="--share-basis N: choose, per projection type, which consecutive blocks share (runs of 1 to N "
                        "blocks, the least calibration output error; blocks where sharing loses keep their own basis)")
    c.add_argument("--share-ratio", type=float, default=0.8, metavar="R",
                   help="--share-basis: the share of the block linears' parameters kept (0.8 = 20%% compression)")
    c.add_argument("--calibrate-all-experts", action="store_true",
                   help="mixtures of experts: run every expert on every calibration token for its statistics, while "
                        "each block's outputs still add only the routed experts (E / k times the expert compute)")
    c.add_argument("--router-weighted-stats", action="store_true",
                   help="mixtures of experts: weigh each routed token in its expert's statistics by its router "
                        "weight (the expert's output enters the block's output scaled by it), so the solvers "
                        "minimize the error the block sees")
    c.add_argument("--min-expert-tokens", type=int, default=128, metavar="N",
                   help="mixtures of experts: an expert routed fewer than N calibration tokens has its statistics "
                        "damped toward isotropic ones (none: the data-free solution); recorded per expert")
    c.add_argument("--trust-remote-code", action="store_true")
    add_device_options(c)
    if planning:
        return
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", help="write the run's results here")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (killed, crashed) from its first unfinished block; the "
                        "settings, model and calibration data must be the same")
    c.add_argument("--offload", metavar="DIR",
                   help="larger than memory: read each block from the checkpoint's safetensors shards when its turn "
                        "comes and write it, compressed, to DIR (Hugging Face folders only; chosen automatically, "
                        "in a temporary folder, when the model does not fit in available memory)")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in MACHINE and a.dest != "help"}


def fields_schema() -> dict[str, argparse.Action]:
    """{field: the argparse action that defines its type, default and choices}."""
    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser, planning=True)
    return _actions(parser)


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
            if isinstance(a, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
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


class Recipe:
    """Every recipe field of a compress run, resolved (read as attributes: `r.budget`, `r.menu`),
    immutable. `Recipe.resolve(spec, **options)` builds one; `to_dict()` is what manifests record."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, Any]):
        schema = fields_schema()
        fields = validate(fields, schema, "recipe")
        missing = sorted(set(schema) - set(fields))
        if missing:
            raise LLMPressError(f"recipe: missing fields {', '.join(missing)} (Recipe.resolve fills the defaults)")
        object.__setattr__(self, "_fields", dict(fields))

    @classmethod
    def resolve(cls, recipe: "str | dict | Recipe | None" = None, **options) -> "Recipe":
        """defaults < the target's default recipe < `recipe` (a preset, a file, a dict, a Recipe) <
        `options` (compress option names: budget="bits=4", num_samples=32, ...)."""
        if isinstance(recipe, Recipe):
            recipe = recipe.to_dict()
        return cls(resolve(options, recipe, fields_schema()))

    def __getattr__(self, name: str):
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(f"a recipe has no field {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("a Recipe is immutable: use recipe.replace(field=value)")

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and self._fields == other._fields

    def __repr__(self) -> str:
        set_ = {k: v for k, v in self._fields.items() if v not in (None, False)}
        return f"Recipe({set_})"

    def replace(self, **changes) -> "Recipe":
        """A copy with these fields changed (validated; no defaults re-derived)."""
        return Recipe({**self._fields, **changes})

    def to_dict(self) -> dict[str, Any]:
        return dict(self._fields)

    def method_config(self):
        """--method NAME[:k=v,...] with the per-method flags (--bits, --group-size, ...) as one config."""
        from llmpress.config import config_from_dict, parse_options
        name, _, spec = self.method.partition(":")        # --method apiq:epochs=2,start=svd
        opts = {"bits": self.bits, "group_size": self.group_size, "sparsity": self.sparsity, "nm": self.nm,
                "param_ratio": self.param_ratio, "damp": self.damp, "alpha": self.alpha, "rank": self.rank,
                "clip": self.clip, "gguf": self.gguf_type, "refine": self.refine, "dim": self.dim,
                "rows": self.rows, "terms": self.terms}
        kwargs = {**parse_options(spec, self.method), **{k: v for k, v in opts.items() if v is not None}}
        if self.refit is not None:
            if name != "gptq":
                raise LLMPressError("--refit applies to --method gptq")
            kwargs["refit"] = self.refit
        if self.asymmetric:
            kwargs["symmetric"] = False
        if self.act_order:
            kwargs["act_order"] = True
        if self.nm is not None:
            kwargs.setdefault("sparsity", None)
        return config_from_dict({"method": name, **kwargs})
