"""GGUF K-quants solved by GPTQ, with a tokenizer converted from Hugging Face, run in llama.cpp.

The embedded SmolLM2-135M: down_proj (1536 inputs, whole 256-weight blocks) GPTQ-solved ON the
Q4_K grid (or Q6_K), every other block linear (576 inputs: no K-quant fits) GPTQ W4 g32 = Q4_0.
The GGUF is written WITHOUT the source GGUF, so its tokenizer is converted from the Hugging Face
tokenizer (llmpress.gguf_export.tokenizer_metadata). llama.cpp (xllamacpp) then continues a prompt
greedily, given as text (its own tokenization from our metadata) and as transformers' token ids;
both are compared with transformers on llmpress's model (the same weights), token by token after
re-tokenizing llama.cpp's text (its completion endpoint returns text).

    .venv/bin/pip install xllamacpp        # bench-only
    .venv/bin/python bench/llamacpp_kquant.py [--out bench/results/llamacpp_kquant.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress import GPTQ  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import llamacpp_server, model_size, perplexity  # noqa: E402
from llmpress.gguf_export import export_gguf, tokenizer_metadata  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402

PROMPT = "The history of the Roman Empire begins with"


def greedy_llamacpp(path: Path, prompt, max_tokens: int) -> tuple[str, int]:
    """(greedy continuation text, number of prompt tokens llama.cpp saw)."""
    server = llamacpp_server(path, n_ctx=256, threads=2)
    r = server.handle_completions({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "top_k": 1,
                                   "seed": 0, "cache_prompt": False})
    del server
    if "choices" not in r:
        raise SystemExit(f"llama.cpp: {r}")
    return r["choices"][0]["text"], r["usage"]["prompt_tokens"]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "llamacpp_kquant.json"))
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-windows", type=int, default=20)
    a = ap.parse_args()
    dense, tok = load_model("smollm2-135m")
    names = adapter_for(dense).linear_names(dense)
    tokens = calibration_tokens(tok, "wikipedia", 64, 512, seed=0)
    ids_eval = eval_tokens(tok, "wikitext2")
    prompt_ids = tok(PROMPT, return_tensors="pt").input_ids
    results = {"prompt": PROMPT, "runs": {}}
    for down in ("q4_k", "q6_k"):
        model = copy.deepcopy(dense)
        plan = {n: GPTQ(gguf=down) if n.endswith("down_proj") else GPTQ(bits=4, group_size=32) for n in names}
        t = time.perf_counter()
        compress(model, plan, tokens, progress=False)
        seconds = time.perf_counter() - t
        with torch.no_grad():
            ref = model.generate(prompt_ids, max_new_tokens=a.max_tokens, do_sample=False)[0, prompt_ids.shape[1]:]
        ref = ref.tolist()
        ppl = perplexity(model, ids_eval, 2048, a.max_windows, progress=False)["perplexity"]
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.gguf"
            fields = tokenizer_metadata(tok, model.config.vocab_size)[0]    # no source GGUF: converted tokenizer
            types = export_gguf(model, path, None, tokenizer_fields=fields)
            text_a, n_prompt_a = greedy_llamacpp(path, PROMPT, a.max_tokens)            # llama.cpp tokenizes
            text_b, n_prompt_b = greedy_llamacpp(path, prompt_ids[0].tolist(), a.max_tokens)   # transformers' ids
            # token-level agreement: llama.cpp's texts re-tokenized by the Hugging Face tokenizer
            from_text = tok(text_a, add_special_tokens=False).input_ids
            from_ids = tok(text_b, add_special_tokens=False).input_ids
            size_mb = path.stat().st_size / 1e6
        run = {"down_proj": down, "types": {t: list(types.values()).count(t) for t in sorted(set(types.values()))},
               "gguf_mb": size_mb, "bits_per_weight": model_size(model)["bits_per_weight"],
               "wikitext2_ppl_transformers": ppl, "compress_seconds": seconds,
               "prompt_tokens": {"transformers": prompt_ids.shape[1], "llamacpp_from_text": n_prompt_a,
                                 "llamacpp_from_ids": n_prompt_b},
               "transformers_tokens": ref, "llamacpp_from_text": from_text, "llamacpp_from_ids": from_ids,
               "text_vs_ids_common_prefix": common_prefix(from_text, from_ids),
               "llamacpp_vs_transformers_common_prefix": common_prefix(from_text, ref),
               "transformers_text": tok.decode(ref), "llamacpp_text": text_a, "llamacpp_text_from_ids": text_b}
        results["runs"][down] = run
        print(json.dumps({k: v for k, v in run.items() if not k.endswith("tokens") and "from_" not in k}, indent=1),
              flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
