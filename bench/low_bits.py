"""Issue 13: quality at 3 bits and below. Every run side by side with the method it improves, on the
embedded model (calibration 64 x 512 `wikipedia` seed 0; WikiText-2 perplexity, seq_len 2048, first
20 windows; bits per weight over the block linears with every scale, zero point and correction
counted, as `llmpress eval` measures it). Compress time is shown against the two-forward floor
(two plain passes of the calibration tokens through the decoder, measured in the same run).

    .venv/bin/python bench/low_bits.py [--only NAME,...] [--sequential] [--reference ALPHA]
                                       [--calib-shape 16x2048] [--split K] [--out bench/results/low_bits.json]

--sequential / --reference: compress's statistics options (true-sequential groups; asymmetric
calibration toward the uncompressed model's outputs, GPTAQ); the run is stored as NAME+seq+ref0.25.
--refine K: every GPTQ layer of the run (also those an allocator chose, from a table measured
without it) gets K QuantEase sweeps after its GPTQ pass; stored as NAME+refine5.
--tune E: E epochs of block-wise tuning of scales and norms (llmpress.tune); stored as NAME+tune2.
--vq-seed S: every gptq-vq layer of the run seeds its k-means with S (an allocation keeps the plan its
table gave): another draw of the same recipe; stored as NAME+vqseedS.
--split K: compress's statistics on the calibration windows each cut into K shorter ones (the same
tokens; sensitivity tables and the rotation search still see the windows as drawn); stored as
NAME/splitK. Runs on "hadamard+r4" / "hadamard+r4o" add online Hadamards (llmpress.rotate.rotate_online)
before down_proj / and o_proj; their allocation tables re-measure only those layers' rows.

The embedded weights went through GGUF Q4_1 once (see ../shared/data/README.md): comparisons
between methods hold, absolute numbers are for this checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress import GPTQ, GPTQLUT, GPTQVQ, GPTQLowRank, Plan  # noqa: E402
from llmpress.allocate import allocate, to_plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.budget import Budget, Table, measure_sensitivity, plan_for_budget, sensitivity_table, table_key  # noqa: E402
from llmpress.config import parse_method_spec  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import model_size, perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.modules import with_dense_cache  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402
from llmpress.rotate import choose_rotation, rotate_model, rotate_online  # noqa: E402

# The allocator's menu for 3 bits and below: GPTQ with MSE clipping per channel and at group 64,
# and GPTQ + a rank-4 correction. Sparsity and low rank alone cost more than 3 bits per weight at
# any level, so they could not be chosen. Six options, not every level of `gptq:...;gptq-lr`
# (14): the table costs one GPTQ solve per layer and option, about 2.3 minutes per block with
# the full menu on this CPU (measured while two other jobs shared its 2 cores).
LOW_MENU = [GPTQ(bits=2, group_size=64, clip="mse"), GPTQ(bits=3, group_size=0, clip="mse"),
            GPTQ(bits=3, group_size=64, clip="mse"), GPTQ(bits=4, group_size=0, clip="mse"),
            GPTQ(bits=4, group_size=64, clip="mse"), GPTQLowRank(bits=3, group_size=0, rank=4)]
SAMPLE_WINDOWS = 8
# the same six options on asymmetric grids (a b-bit zero point per group or row, counted)
LOW_MENU_ASYM = [GPTQ(bits=2, group_size=64, symmetric=False, clip="mse"),
                 GPTQ(bits=3, group_size=0, symmetric=False, clip="mse"),
                 GPTQ(bits=3, group_size=64, symmetric=False, clip="mse"),
                 GPTQ(bits=4, group_size=0, symmetric=False, clip="mse"),
                 GPTQ(bits=4, group_size=64, symmetric=False, clip="mse"),
                 GPTQLowRank(bits=3, group_size=0, rank=4, symmetric=False)]
# a finer asymmetric menu: the knapsack's choices at 3.25 / 3.0 bits are mostly per channel, group 64
# or one bit away; group 32 and 128 options fill the gaps between them (2.14 ... 4.30 bits per weight).
# GPTQ + rank 4 was never chosen on the asymmetric menu, so it is left out (the table costs one
# GPTQ solve per layer and option).
LOW_MENU_FINE = [GPTQ(bits=b, group_size=g, symmetric=False, clip="mse")
                 for b, g in ((2, 128), (2, 64), (2, 32), (3, 0), (3, 128), (3, 64), (3, 32), (4, 0), (4, 128), (4, 64))]
# non-uniform tables (gptq-lut) measured as a second table and merged with the fine menu's
LUT_OPTIONS = [GPTQLUT(bits=2), GPTQLUT(bits=3)]
LOW_MENU_FINE_LUT = LOW_MENU_FINE + LUT_OPTIONS
# vector codebooks (gptq-vq, GPTVQ 2-D): a third table, merged with both; 2.5 and 3.5 bits are
# whole codes per pair of weights
VQ_OPTIONS = [GPTQVQ(bits=b) for b in (2, 2.5, 3, 3.5)]
LOW_MENU_FINE_LUT_VQ = LOW_MENU_FINE_LUT + VQ_OPTIONS

# online Hadamards on top of the residual rotation: "hadamard+r4" (before down_proj, QuaRot's R4),
# "hadamard+r4o" (also before o_proj, across heads)
ONLINE = {"r4": ["mlp.down_proj"], "r4o": ["mlp.down_proj", "self_attn.o_proj"]}

# name -> (rotation or None, method spec | ("budget", budget, menu))
RUNS = {
    "alloc-3.0-rot": ("hadamard", ("budget", "bits=3.0", LOW_MENU)),
    "alloc-3.25-rot": ("hadamard", ("budget", "bits=3.25", LOW_MENU)),
    "alloc-2.5-rot": ("hadamard", ("budget", "bits=2.5", LOW_MENU)),
    "alloc-3.0": (None, ("budget", "bits=3.0", LOW_MENU)),
    "alloc-3.0-rot-asym": ("hadamard", ("budget", "bits=3.0", LOW_MENU_ASYM)),
    "alloc-3.25-rot-asym": ("hadamard", ("budget", "bits=3.25", LOW_MENU_ASYM)),
    "alloc-2.5-rot-asym": ("hadamard", ("budget", "bits=2.5", LOW_MENU_ASYM)),
    "alloc-3.25-rotsearch-asym": ("hadamard-search", ("budget", "bits=3.25", LOW_MENU_ASYM)),
    "alloc-3.25-rot-fine": ("hadamard", ("budget", "bits=3.25", LOW_MENU_FINE)),
    "alloc-3.0-rot-fine": ("hadamard", ("budget", "bits=3.0", LOW_MENU_FINE)),
    "alloc-2.5-rot-fine": ("hadamard", ("budget", "bits=2.5", LOW_MENU_FINE)),
    "alloc-3.25-rot-fine-lut": ("hadamard", ("budget", "bits=3.25", LOW_MENU_FINE_LUT)),
    "alloc-3.0-rot-fine-lut": ("hadamard", ("budget", "bits=3.0", LOW_MENU_FINE_LUT)),
    "alloc-2.5-rot-fine-lut": ("hadamard", ("budget", "bits=2.5", LOW_MENU_FINE_LUT)),
    "rot-gptq-lut-w3": ("hadamard", "gptq-lut:bits=3"),
    "rot-r4-gptq-w3ch-asym-mse": ("hadamard+r4", "gptq:bits=3,group_size=0,symmetric=false,clip=mse"),
    "rot-r4o-gptq-w3ch-asym-mse": ("hadamard+r4o", "gptq:bits=3,group_size=0,symmetric=false,clip=mse"),
    "rot-r4o-gptq-w3g64-asym-mse": ("hadamard+r4o", "gptq:bits=3,group_size=64,symmetric=false,clip=mse"),
    "alloc-3.25-rot-r4o-fine-lut": ("hadamard+r4o", ("budget", "bits=3.25", LOW_MENU_FINE_LUT)),
    "alloc-3.0-rot-r4o-fine-lut": ("hadamard+r4o", ("budget", "bits=3.0", LOW_MENU_FINE_LUT)),
    "alloc-2.5-rot-r4o-fine-lut": ("hadamard+r4o", ("budget", "bits=2.5", LOW_MENU_FINE_LUT)),
    "rot-gptq-lut-w2": ("hadamard", "gptq-lut:bits=2"),
    "alloc-3.25-rot-r4o-fine-lut-vq": ("hadamard+r4o", ("budget", "bits=3.25", LOW_MENU_FINE_LUT_VQ)),
    "alloc-3.0-rot-r4o-fine-lut-vq": ("hadamard+r4o", ("budget", "bits=3.0", LOW_MENU_FINE_LUT_VQ)),
    "alloc-2.5-rot-r4o-fine-lut-vq": ("hadamard+r4o", ("budget", "bits=2.5", LOW_MENU_FINE_LUT_VQ)),
    "rot-r4o-gptq-vq-w3": ("hadamard+r4o", "gptq-vq:bits=3"),
    "rot-r4o-gptq-vq-w3-seed1": ("hadamard+r4o", "gptq-vq:bits=3,seed=1"),   # another k-means seeding: the draw's noise
    "rot-r4o-gptq-vq-w2.5": ("hadamard+r4o", "gptq-vq:bits=2.5"),
    "rot-r4o-gptq-vq-w2": ("hadamard+r4o", "gptq-vq:bits=2"),
    "rot-r4o-gptq-lut-w3": ("hadamard+r4o", "gptq-lut:bits=3"),
    "rot-r4o-gptq-lut-w2": ("hadamard+r4o", "gptq-lut:bits=2"),
    "rot-gptq-w2g64-asym-mse": ("hadamard", "gptq:bits=2,group_size=64,symmetric=false,clip=mse"),
    "gptq-w3g64": (None, "gptq:bits=3,group_size=64"),
    "gptq-w3g64-mse": (None, "gptq:bits=3,group_size=64,clip=mse"),
    "rot-gptq-w3g64": ("hadamard", "gptq:bits=3,group_size=64"),
    "rot-gptq-w3g64-mse": ("hadamard", "gptq:bits=3,group_size=64,clip=mse"),
    "randrot-gptq-w3g64-mse": ("random", "gptq:bits=3,group_size=64,clip=mse"),
    "gptq-w3ch": (None, "gptq:bits=3,group_size=0"),
    "gptq-w3ch-mse": (None, "gptq:bits=3,group_size=0,clip=mse"),
    "rot-gptq-w3ch-mse": ("hadamard", "gptq:bits=3,group_size=0,clip=mse"),
    "rot-gptq-lr-w3ch-r8": ("hadamard", "gptq-lr:bits=3,group_size=0,rank=8"),
    "rotsearch-gptq-w3ch-mse": ("hadamard-search", "gptq:bits=3,group_size=0,clip=mse"),
    "sparsegpt-50": (None, "sparsegpt:sparsity=0.5"),
    "oats-0.5": (None, "oats:param_ratio=0.5"),
    "rtn-w3g64": (None, "rtn:bits=3,group_size=64"),
    "rtn-w3g64-mse": (None, "rtn:bits=3,group_size=64,clip=mse"),
    "awq-w3g64": (None, "awq:bits=3,group_size=64"),
    "awq-w3g64-mse": (None, "awq:bits=3,group_size=64,clip=mse"),
    # asymmetric grids (a b-bit zero point per group / row, counted): the GPTQ / AWQ references' default
    "rot-gptq-w3ch-asym-mse": ("hadamard", "gptq:bits=3,group_size=0,symmetric=false,clip=mse"),
    "rot-gptq-w3g64-asym-mse": ("hadamard", "gptq:bits=3,group_size=64,symmetric=false,clip=mse"),
    "awq-w3g64-asym": (None, "awq:bits=3,group_size=64,symmetric=false"),
    "gptq-w2g64": (None, "gptq:bits=2,group_size=64"),
    "rot-gptq-w2g64-mse": ("hadamard", "gptq:bits=2,group_size=64,clip=mse"),
}


def _count(configs: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in configs.values():
        label = "dense" if c is None else c.label()
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def floor_seconds(model, tokens) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(2):
            for s in range(0, tokens.shape[0], 8):
                model.model(tokens[s:s + 8], use_cache=False)
    return time.perf_counter() - t


def table_with_online(model, dense, tokens, menu, tag, rotation, calib="", progress=False) -> Table:
    """The sensitivity table of the model rotated by `rotation` ("hadamard" or "hadamard+r4o", ...).
    With online Hadamards only the rotated layers' rows are measured anew (cached in their own file,
    keyed by the rotated model); every other layer's row is the plain Hadamard table's, which is
    what a full measurement would give: the dense model computes the same function, and those
    layers' weights and inputs are unchanged. Without a plain table for these tokens (another
    calibration shape: `calib` names it in the file names) the rotated model's table is measured whole."""
    cache = ROOT / "bench" / ".cache"
    base_rotation, _, online = rotation.partition("+")
    base_path = cache / f"low-bits-{tag}-{base_rotation}{calib}.json"
    if not online or not base_path.is_file():
        return sensitivity_table(model, tokens, menu, SAMPLE_WINDOWS, cache / f"low-bits-{tag}-{rotation}{calib}.json",
                                 progress=progress)[0]
    base_model = copy.deepcopy(dense)                       # the plain residual rotation, as its table was measured
    rotate_model(base_model, base_rotation)
    table = sensitivity_table(base_model, tokens, menu, SAMPLE_WINDOWS, base_path, progress=progress)[0]
    del base_model
    names = {n for n in adapter_for(model).linear_names(model) if any(n.endswith(o) for o in ONLINE[online])}
    key = table_key(model, tokens, menu, SAMPLE_WINDOWS)
    path = cache / f"low-bits-{tag}-{rotation}{calib}-rows.json"
    rows = Table.load(path) if path.is_file() else None
    if rows is None or rows.meta.get("key") != key:
        rows = measure_sensitivity(model, tokens, menu, SAMPLE_WINDOWS, progress=progress, only=names)
        rows.meta["key"] = key
        rows.save(path)
    return Table({**table.layers, **rows.layers}, {**table.meta, "key": key, "rows_replaced": sorted(rows.layers),
                                                   "rows_seconds": rows.meta["seconds"]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "low_bits.json"))
    ap.add_argument("--only", help="comma-separated run names")
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--calib-shape", default="64x512", help="calibration windows x tokens (same token count: 16x2048)")
    ap.add_argument("--split", type=int, default=1, help="cut each calibration window into this many (the same tokens)")
    ap.add_argument("--sequential", action="store_true", help="measure each input group after the ones before it")
    ap.add_argument("--reference", type=float, default=0.0, help="asymmetric calibration share (GPTAQ: 0.25)")
    ap.add_argument("--refine", type=int, default=0, help="QuantEase sweeps added to every GPTQ layer")
    ap.add_argument("--tune", type=int, default=0, help="epochs of block-wise scale / norm tuning (llmpress.tune)")
    ap.add_argument("--vq-seed", type=int, help="another k-means seeding for every gptq-vq layer of the run (the "
                                                 "allocation stays the one its table gave): the draw's noise")
    a = ap.parse_args()
    n_calib, calib_len = (int(v) for v in a.calib_shape.split("x"))
    suffix = "" if a.calib_shape == "64x512" else f"@calib{a.calib_shape}"
    suffix += f"/split{a.split}" if a.split > 1 else ""
    suffix += ("+seq" if a.sequential else "") + (f"+ref{a.reference:g}" if a.reference else "")
    suffix += f"+refine{a.refine}" if a.refine else ""
    suffix += f"+tune{a.tune}" if a.tune else ""
    suffix += f"+vqseed{a.vq_seed}" if a.vq_seed is not None else ""

    dense, tok = load_model("smollm2-135m")
    tokens = calibration_tokens(tok, "wikipedia", n_calib, calib_len, seed=0)
    if calib_len % a.split:
        ap.error(f"--split {a.split} does not divide the window length {calib_len}")
    # the sensitivity tables are measured on the windows as drawn; compress's statistics on the same
    # tokens cut into shorter windows (the same token count and text)
    table_tokens, tokens = tokens, tokens.reshape(n_calib * a.split, calib_len // a.split)
    ids = eval_tokens(tok, "wikitext2")
    names = adapter_for(dense).linear_names(dense)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("_floor_seconds", floor_seconds(dense, tokens))
    print(f"two-forward floor: {results['_floor_seconds']:.1f}s", flush=True)
    for name in (a.only.split(",") if a.only else RUNS):
        rotation, spec = RUNS[name]
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        rot_info = None
        if rotation == "hadamard-search":       # HeRo-Q's idea: the seed with the smallest measured error
            seed, searched = choose_rotation(model, table_tokens[:16], "hadamard", range(8), progress=False)
            rot_info = {**rotate_model(model, "hadamard", seed), "search": searched}
        elif rotation:
            base_rotation, _, online = rotation.partition("+")
            rot_info = rotate_model(model, base_rotation)
            if online:
                rot_info["online"] = rotate_online(model, ONLINE[online])
        allocation = None
        if isinstance(spec, tuple):
            _, budget, menu = spec
            cache = ROOT / "bench" / ".cache"
            if menu is LOW_MENU_FINE_LUT or menu is LOW_MENU_FINE_LUT_VQ:   # the fine menu's table and the LUT (VQ) options' tables, merged
                calib = "" if a.calib_shape == "64x512" else f"@{a.calib_shape}"
                table = table_with_online(model, dense, table_tokens, LOW_MENU_FINE, "fine", rotation, calib)
                table = table.merged(table_with_online(model, dense, table_tokens, LUT_OPTIONS, "lut", rotation, calib))
                if menu is LOW_MENU_FINE_LUT_VQ:
                    table = table.merged(table_with_online(model, dense, table_tokens, VQ_OPTIONS, "vq", rotation, calib))
                plan = to_plan(table, allocate(table, Budget.parse(budget), "knapsack")[0])
            else:
                menu_tag = {id(LOW_MENU_ASYM): "asym", id(LOW_MENU_FINE): "fine"}.get(id(menu), "table6")
                allocated = plan_for_budget(model, table_tokens, Budget.parse(budget), menu, sample_windows=SAMPLE_WINDOWS,
                                            table_path=cache / (f"low-bits-{menu_tag}-{rotation or 'none'}"
                                                                + ("" if a.calib_shape == "64x512" else f"@{a.calib_shape}") + ".json"),
                                            progress=False)
                plan, table = allocated.plan, allocated.table
            allocation = {"table_seconds": table.meta.get("seconds"), "rows_seconds": table.meta.get("rows_seconds"),
                          "chosen": _count(plan.resolve(names))}
        else:
            plan = Plan.uniform(parse_method_spec(spec))
        configs = plan.resolve(names)
        if a.refine:
            configs = {k: dataclasses.replace(c, refine=a.refine) if isinstance(c, GPTQ) else c for k, c in configs.items()}
        if a.vq_seed is not None:
            configs = {k: dataclasses.replace(c, seed=a.vq_seed) if isinstance(c, GPTQVQ) else c for k, c in configs.items()}
        report = compress(model, configs, tokens, progress=False, sequential=a.sequential,
                          reference=a.reference, tune=a.tune)
        seconds = time.perf_counter() - t
        for module in model.modules():        # evaluation only: skip rebuilding weights per window
            with_dense_cache(module)
        ppl = perplexity(model, ids, 2048, a.max_windows, progress=False)
        size = model_size(model)
        method = spec if isinstance(spec, str) else {"budget": spec[1], "menu": [c.label() for c in spec[2]]}
        results[name + suffix] = {"calibration": a.calib_shape, "split": a.split, "sequential": a.sequential,
                                  "reference": a.reference, "refine": a.refine, "tune": a.tune, "rotation": rot_info, "method": method, "perplexity": ppl["perplexity"],
                         "windows": ppl.get("windows"), "bits_per_weight": size["bits_per_weight"],
                         "compress_seconds": seconds, "x_floor": seconds / results["_floor_seconds"],
                         "fallbacks": sum("fallback" in v for v in report.layers.values()),
                         "allocation": allocation}
        print(f"{name + suffix:28s} ppl {ppl['perplexity']:8.3f}  {size['bits_per_weight']:.3f} bpw  "
              f"{seconds:6.1f}s ({seconds / results['_floor_seconds']:.1f}x floor)", flush=True)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
