"""gptq-lr in llama.cpp: the quantized base as Q4_0 blocks in the GGUF, the low-rank corrections as
a GGUF LoRA adapter, run by llama.cpp (xllamacpp) with and without the adapter; the greedy
continuation is compared with transformers on llmpress's own model (base + correction).

    .venv/bin/pip install xllamacpp        # bench-only
    .venv/bin/python bench/llamacpp_lora.py [--out bench/results/llamacpp_lora.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress import GPTQLowRank, Plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens  # noqa: E402
from llmpress.eval import llamacpp_server  # noqa: E402
from llmpress.gguf_export import export_gguf  # noqa: E402
from llmpress.models import load_model, resolve_source  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402

PROMPT = "The history of the Roman Empire begins with"


def greedy_llamacpp(model_path: Path, lora: Path | None, max_tokens: int) -> str:
    server = llamacpp_server(model_path, n_ctx=256, threads=2, lora=lora)
    r = server.handle_completions({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "top_k": 1,
                                   "seed": 0, "cache_prompt": False})
    del server
    return r["choices"][0]["text"] if "choices" in r else r.get("content")


def add_agreement(result: dict, tok) -> None:
    """Leading greedy tokens llama.cpp shares with transformers, with and without the adapter
    (llama.cpp rounds activations to 8 bits for its Q4_0 / Q8_0 matmuls, so near-ties may flip)."""
    ref = tok(result["transformers_llmpress"]).input_ids
    for key in ("llamacpp_base_plus_lora", "llamacpp_base_only"):
        got = tok(result[key]).input_ids
        same = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), min(len(ref), len(got)))
        result[key + "_common_prefix_tokens"] = same
    result["reference_tokens"] = len(ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "llamacpp_lora.json"))
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    _, source = resolve_source("smollm2-135m")
    names = adapter_for(model).linear_names(model)
    tokens = calibration_tokens(tok, "wikipedia", 8, 512, seed=0)
    compress(model, Plan.uniform(GPTQLowRank(bits=4, group_size=32, rank=8)).resolve(names), tokens, progress=False)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=a.max_tokens, do_sample=False)
    ours = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    with tempfile.TemporaryDirectory() as d:
        gguf_path, lora = Path(d) / "base.gguf", Path(d) / "lora.gguf"
        types = export_gguf(model, gguf_path, source, adapter_out=lora)
        with_lora = greedy_llamacpp(gguf_path, lora, a.max_tokens)
        without = greedy_llamacpp(gguf_path, None, a.max_tokens)
    result = {"prompt": PROMPT, "transformers_llmpress": ours, "llamacpp_base_plus_lora": with_lora,
              "llamacpp_base_only": without, "lora_equals_transformers": with_lora.strip() == ours.strip(),
              "base_types": sorted(set(types.values()))}
    add_agreement(result, tok)
    print(json.dumps(result, indent=1))
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
