"""Issue 12: the embedded model exported to GGUF and run by llama.cpp (xllamacpp, CPU wheel).

In one run, on the same dense weights:
- ours: GPTQ W4 g32 symmetric (calibration 64 x 512 `wikipedia`, seed 0), exported as Q4_0 blocks
  from its own codes and scales (no re-quantization); embeddings copied from the source GGUF (Q8_0),
  and once more with the (tied) embedding re-quantized to Q4_0 (`embedding_type`);
- llama.cpp's own Q4_0 of the same model: every block linear rounded to nearest by gguf-py's
  Q4_0 quantizer from its fp16 weight (embeddings copied likewise);
- the dense model as F32 and as F16 GGUF (embeddings in that type too).
Measured: file size; WikiText-2 perplexity (seq_len 2048, first 20 windows) of ours and of the
Q4_0 reference through transformers' GGUF reader; llama.cpp decode and prompt tokens/s (greedy,
2 threads, best of 3); and whether llama.cpp's greedy continuation on ours equals transformers'.

    .venv/bin/pip install xllamacpp        # bench-only
    .venv/bin/python bench/llamacpp.py [--out bench/results/llamacpp.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress import GPTQ, Plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import llamacpp_server, perplexity  # noqa: E402
from llmpress.gguf_export import export_gguf  # noqa: E402
from llmpress.models import load_model, resolve_source  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402

PROMPT = "The history of the Roman Empire begins with"


def llama_cpp(path: Path, max_tokens: int = 64, repeats: int = 3) -> dict:
    server = llamacpp_server(path, n_ctx=512, threads=2)
    best = {"decode_tokens_per_s": 0.0, "prompt_tokens_per_s": 0.0}
    text = None
    for _ in range(repeats):
        r = server.handle_completions({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
                                       "top_k": 1, "seed": 0, "cache_prompt": False})
        t = r["timings"]
        best["decode_tokens_per_s"] = max(best["decode_tokens_per_s"], t["predicted_per_second"])
        best["prompt_tokens_per_s"] = max(best["prompt_tokens_per_s"], t["prompt_per_second"])
        text = r["choices"][0]["text"] if "choices" in r else r.get("content")
    best["greedy_text"] = text
    del server
    return best


def main() -> None:
    import gguf
    from transformers import AutoModelForCausalLM
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "llamacpp.json"))
    ap.add_argument("--windows", type=int, default=20)
    a = ap.parse_args()
    _, source = resolve_source("smollm2-135m")
    dense, tok = load_model("smollm2-135m")
    ids = eval_tokens(tok, "wikitext2")
    tokens = calibration_tokens(tok, "wikipedia", 64, 512, seed=0)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "windows": a.windows, "files": {}}
    q4_0 = gguf.GGMLQuantizationType.Q4_0

    def reference_q4_0(fqn, w):       # llama.cpp's Q4_0 from the fp16 weight, as `llama-quantize` would
        return gguf.quants.quantize(w.astype(np.float16).astype(np.float32), q4_0), q4_0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = GPTQ(bits=4, group_size=32, symmetric=True)
        model = load_model("smollm2-135m")[0]
        t = time.perf_counter()
        compress(model, Plan.uniform(ours).resolve(adapter_for(model).linear_names(model)), tokens, progress=False)
        results["gptq_seconds"] = time.perf_counter() - t
        files = {"llmpress GPTQ W4 g32 -> Q4_0": (model, {"source_gguf": source}),
                 "llmpress GPTQ W4 g32 -> Q4_0, embeddings Q4_0": (model, {"source_gguf": source,
                                                                          "embedding_type": "Q4_0"}),
                 "llama.cpp Q4_0 (round to nearest)": (dense, {"source_gguf": source, "encode": reference_q4_0}),
                 "F32": (dense, {"source_gguf": source, "float_type": "F32", "copy_embeddings": False}),
                 "F16": (dense, {"source_gguf": source, "float_type": "F16", "copy_embeddings": False})}
        for k, (name, (m, kw)) in enumerate(files.items()):
            path = tmp / f"m{k}.gguf"
            export_gguf(m, path, **kw)
            row = {"bytes": path.stat().st_size, **llama_cpp(path)}
            if k < 3:                           # the quality comparison: through transformers' GGUF reader
                loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name).eval()
                row["perplexity"] = perplexity(loaded, ids, 2048, a.windows, progress=False)["perplexity"]
                if k == 0:
                    prompt = tok(PROMPT, return_tensors="pt").input_ids
                    gen = loaded.generate(prompt, max_new_tokens=64, do_sample=False)
                    row["transformers_greedy_text"] = tok.decode(gen[0, prompt.shape[1]:])
                    row["greedy_equal"] = row["transformers_greedy_text"] == row["greedy_text"]
                    row["llmpress_logits_equal"] = bool(torch.equal(loaded(prompt).logits, model(prompt).logits))
                del loaded
            results["files"][name] = row
            print(name, json.dumps({k2: v for k2, v in row.items() if "text" not in k2}), flush=True)
            Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    f = results["files"]
    o, r32, r16 = f["llmpress GPTQ W4 g32 -> Q4_0"], f["F32"], f["F16"]
    results["decode_vs_f32"] = o["decode_tokens_per_s"] / r32["decode_tokens_per_s"]
    results["decode_vs_f16"] = o["decode_tokens_per_s"] / r16["decode_tokens_per_s"]
    e = f["llmpress GPTQ W4 g32 -> Q4_0, embeddings Q4_0"]
    results["embeddings_q4_0_decode_vs_f32"] = e["decode_tokens_per_s"] / r32["decode_tokens_per_s"]
    print(f"with Q4_0 embeddings: {results['embeddings_q4_0_decode_vs_f32']:.2f}x F32, perplexity {e['perplexity']:.3f}")
    print(f"decode: {results['decode_vs_f32']:.2f}x F32, {results['decode_vs_f16']:.2f}x F16; perplexity ours "
          f"{o['perplexity']:.3f} vs llama.cpp Q4_0 {f['llama.cpp Q4_0 (round to nearest)']['perplexity']:.3f}")
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
