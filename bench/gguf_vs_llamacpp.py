"""Issue 23: llmpress's GGUF against llama.cpp's own imatrix quantizer, in one run, on the same
dense weights and the same calibration tokens.

On the embedded SmolLM2-135M (576-wide rows). `--grid q4_0` (default): Q4_0, the type every block
linear takes; `--grid iq4_nl`: IQ4_NL (the same 4.5 bits per weight, a non-uniform table);
`--grid iq4_xs`: IQ4_XS where the rows are whole 256-weight blocks (down_proj), IQ4_NL elsewhere,
llama-quantize's fallback. Files, all with the source GGUF's embedding bytes (identical across
files, so only the block linears differ):
- llama.cpp Q4_0 with an importance matrix: ggml_quantize_chunk (bench/ggml_reference.py, the code
  `llama-quantize --imatrix` runs) with the imatrix llama-imatrix would compute from these
  windows: the mean x^2 of each linear's inputs in the dense model over the calibration tokens;
- llama.cpp Q4_0 without imatrix;
- llmpress GPTQ W4 g32 symmetric (= Q4_0 blocks, no re-quantization) with clip none / mse /
  search (llama.cpp's importance-weighted signed scale search, Hessian diagonal as importance) and
  search + refit (scales re-fitted jointly to the chosen codes in the Hessian metric, 3 rounds),
  then with the pipeline's true-sequential statistics, GPTAQ reference stream and block tuning.
Measured: file size; WikiText-2 perplexity through transformers' GGUF reader (llmpress's protocol,
seq_len 2048, first `--windows` windows) and, with `--tools DIR` (../shared/tools/llama-cpp-tools.sh
DIR), llama.cpp's own `llama-perplexity` (context 512, first `--chunks` chunks); the increase over
the dense / F16 file and its ratio to llama.cpp's imatrix file.

    .venv/bin/python bench/gguf_vs_llamacpp.py --tools /work/tools/llama [--grid iq4_nl] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from ggml_reference import quantize_all  # noqa: E402
from llmpress import GPTQ  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens, load_text  # noqa: E402
from llmpress.eval import perplexity  # noqa: E402
from llmpress.gguf_export import export_gguf, qk_permutation  # noqa: E402
from llmpress.models import load_model, resolve_source  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402

# --grid: the llama.cpp type of every block linear (by its row length: llama-quantize's fallback
# for rows that are not whole 256-weight blocks, IQ4_XS -> IQ4_NL) and llmpress's variants on it
GRIDS = {
    "q4_0": (lambda cols: "Q4_0", {
        "llmpress GPTQ W4 g32 (Q4_0)": GPTQ(bits=4, group_size=32),
        "llmpress GPTQ W4 g32 clip=mse": GPTQ(bits=4, group_size=32, clip="mse"),
        "llmpress GPTQ W4 g32 clip=search": GPTQ(bits=4, group_size=32, clip="search"),
        "llmpress GPTQ W4 g32 clip=search refit=3": GPTQ(bits=4, group_size=32, clip="search", refit=3),
        # with the pipeline's options: true-sequential statistics, GPTAQ's reference stream, block tuning
        "llmpress GPTQ W4 g32 clip=search refit=3 sequential reference=0.25":
            (GPTQ(bits=4, group_size=32, clip="search", refit=3), {"sequential": True, "reference": 0.25}),
        "llmpress GPTQ W4 g32 clip=search refit=3 sequential reference=0.25 tune=2":
            (GPTQ(bits=4, group_size=32, clip="search", refit=3), {"sequential": True, "reference": 0.25, "tune": 2}),
    }),
    "iq4_nl": (lambda cols: "IQ4_NL", {
        "llmpress GPTQ gguf=iq4_nl": GPTQ(gguf="iq4_nl"),
        "llmpress GPTQ gguf=iq4_nl refine=2": GPTQ(gguf="iq4_nl", refine=2),
    }),
    "iq4_xs": (lambda cols: "IQ4_XS" if cols % 256 == 0 else "IQ4_NL", {
        "llmpress GPTQ gguf=iq4_xs": GPTQ(gguf="iq4_xs"),
        "llmpress GPTQ gguf=iq4_xs refine=2": GPTQ(gguf="iq4_xs", refine=2),
    }),
}


def plan_on(cfg: GPTQ, type_of, model) -> dict:
    """{fqn: config}: cfg where its grid takes the layer's rows, else the same solver on llama.cpp's fallback type."""
    out = {}
    for name in adapter_for(model).linear_names(model):
        cols = model.get_submodule(name).in_features
        kind = type_of(cols)
        out[name] = cfg if not cfg.gguf or kind.lower() == cfg.gguf else dataclasses.replace(cfg, gguf=kind.lower())
    return out


@torch.no_grad()
def imatrix(model, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """{linear fqn: mean over calibration tokens of x_j^2 (in,)}: llama-imatrix's statistic, on the dense model."""
    names = adapter_for(model).linear_names(model)
    sums, hooks = {}, []
    for name in names:
        def hook(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s, n = sums.get(name, (0.0, 0))
            sums[name] = (s + (x * x).sum(0), n + x.shape[0])
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for row in tokens:
            model(row[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: (s / n).float().numpy() for k, (s, n) in sums.items()}


def llama_perplexity(tools: Path, path: Path, text: Path, chunks: int) -> float:
    r = subprocess.run([str(tools / "llama"), "perplexity", "-m", str(path), "-f", str(text), "-c", "512",
                        "--chunks", str(chunks), "-t", "2"], capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if not m:
        raise RuntimeError(f"llama-perplexity failed on {path}: {(r.stdout + r.stderr)[-2000:]}")
    return float(m.group(1))


def main() -> None:
    import gguf
    from transformers import AutoModelForCausalLM
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="default bench/results/gguf_vs_llamacpp[_GRID].json")
    ap.add_argument("--tools", type=Path, help="llama.cpp tools folder (../shared/tools/llama-cpp-tools.sh DIR)")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--grid", choices=list(GRIDS), default="q4_0")
    a = ap.parse_args()
    type_of, variants = GRIDS[a.grid]
    _, source = resolve_source("smollm2-135m")
    dense, tok = load_model("smollm2-135m")
    ids = eval_tokens(tok, "wikitext2")
    tokens = calibration_tokens(tok, "wikipedia", 64, 512, seed=0)
    config = dense.config
    results = {"date": time.strftime("%Y-%m-%d"), "model": "smollm2-135m", "calibration": "wikipedia 64 x 512 seed 0",
               "windows": a.windows, "chunks": a.chunks, "files": {}}
    results["grid"] = a.grid
    out = Path(a.out or ROOT / "bench" / "results" / f"gguf_vs_llamacpp{'' if a.grid == 'q4_0' else '_' + a.grid}.json")
    if a.only and out.exists():            # a partial run adds its rows to the file's earlier ones
        results["files"] = json.loads(out.read_text()).get("files", {})

    def measure(name: str, model, path: Path, tmp: Path, seconds: float | None = None) -> None:
        row = {"bytes": path.stat().st_size, "compress_seconds": seconds}
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name).eval()
        row["perplexity"] = perplexity(loaded, ids, 2048, a.windows, progress=False)["perplexity"]
        del loaded
        if a.tools:
            row["llama_perplexity_512"] = llama_perplexity(a.tools, path, ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw",
                                                           a.chunks)
        results["files"][name] = row
        print(name, json.dumps(row), flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")

    serial = iter(range(10 ** 6))           # file names (results may hold rows of an earlier run)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config.save_pretrained(tmp)
        t = time.perf_counter()
        dense_ppl = perplexity(dense, ids, 2048, a.windows, progress=False)["perplexity"]
        results["dense_perplexity"] = dense_ppl
        export_gguf(dense, tmp / "f16.gguf", source_gguf=source, float_type="F16")
        results["files"]["F16 (block linears)"] = {"bytes": (tmp / "f16.gguf").stat().st_size, "perplexity": dense_ppl}
        if a.tools:
            results["files"]["F16 (block linears)"]["llama_perplexity_512"] = llama_perplexity(
                a.tools, tmp / "f16.gguf", ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw", a.chunks)
        print("dense", json.dumps(results["files"]["F16 (block linears)"]), f"{time.perf_counter() - t:.0f} s", flush=True)

        if a.tools:                      # llama.cpp's quantizer on the fp16 weights, with and without imatrix
            t = time.perf_counter()
            imp = imatrix(dense, tokens)
            results["imatrix_seconds"] = time.perf_counter() - t
            names = adapter_for(dense).linear_names(dense)
            kinds = {n: type_of(dense.get_submodule(n).in_features) for n in names}
            for label, use in ((f"llama.cpp {a.grid.upper()} imatrix", True), (f"llama.cpp {a.grid.upper()}", False)):
                t = time.perf_counter()
                q = quantize_all(a.tools, {n: (dense.get_submodule(n).weight.detach().half().float().numpy(), kinds[n],
                                               imp[n] if use else None) for n in names})
                seconds = time.perf_counter() - t

                def encode(fqn, w, q=q):
                    raw = q[fqn]
                    perm = qk_permutation(config, fqn, raw.shape[0])     # the export's q / k row order
                    if perm is not None:
                        raw = raw[perm.numpy()]
                    return raw, getattr(gguf.GGMLQuantizationType, kinds[fqn])
                path = tmp / f"{next(serial)}.gguf"
                export_gguf(dense, path, source_gguf=source, encode=encode)
                measure(label, dense, path, tmp, seconds)

        only = {s.strip() for s in a.only.split(",") if s.strip()}
        for label, cfg in variants.items():
            if only and label not in only:
                continue
            cfg, options = cfg if isinstance(cfg, tuple) else (cfg, {})
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            plan = plan_on(cfg, type_of, model)
            compress(model, plan, tokens, progress=False, **options)
            seconds = time.perf_counter() - t
            path = tmp / f"{next(serial)}.gguf"
            types = export_gguf(model, path, source_gguf=source)
            kinds = {type_of(model.get_submodule(n).in_features) for n in plan}
            assert all(v in kinds for k, v in types.items() if k.startswith("blk.") and "norm" not in k), types
            measure(label, model, path, tmp, seconds)
            del model

    files = results["files"]
    base = files["F16 (block linears)"]
    ref = files.get(f"llama.cpp {a.grid.upper()} imatrix")
    for name, row in files.items():
        for key in ("perplexity", "llama_perplexity_512"):
            if key in row and key in base:
                row[f"{key}_increase"] = row[key] - base[key]
                if ref is not None and key in ref and ref[key] > base[key]:
                    row[f"{key}_increase_vs_llamacpp_imatrix"] = (row[key] - base[key]) / (ref[key] - base[key])
    out.write_text(json.dumps(results, indent=1) + "\n")
    print("| file | MB | WikiText-2 ppl (2048 x %d, transformers) | increase vs llama.cpp imatrix | llama-perplexity ctx 512 | increase vs imatrix |" % a.windows)
    print("|---|---|---|---|---|---|")
    for name, row in files.items():
        print(f"| {name} | {row['bytes'] / 1e6:.1f} | {row['perplexity']:.3f} | "
              f"{row.get('perplexity_increase_vs_llamacpp_imatrix', float('nan')):.2f}x | "
              f"{row.get('llama_perplexity_512', float('nan')):.3f} | "
              f"{row.get('llama_perplexity_512_increase_vs_llamacpp_imatrix', float('nan')):.2f}x |")


if __name__ == "__main__":
    main()
