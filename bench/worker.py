"""One compression run in its own process (so peak memory is the run's own), printing one JSON line.

    python bench/worker.py --tool llmpress|llmcompressor --method NAME --model DIR --tokens FILE

`--tool llmcompressor` runs inside the peer's virtual environment; it imports llmpress only for the
shared perplexity protocol (llmpress.eval / llmpress.data, pure torch + transformers).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# benchmark name -> llmpress method spec (the peer's recipe for the same name: peer_recipe)
METHODS = {
    "gptq-w4g64": "gptq:bits=4,group_size=64",
    "gptq-w3g64": "gptq:bits=3,group_size=64",
    "rtn-w4g64": "rtn:bits=4,group_size=64",
    "rtn-w3g64": "rtn:bits=3,group_size=64",
    "sparsegpt-50": "sparsegpt:sparsity=0.5",
    "wanda-50": "wanda:sparsity=0.5",
    "magnitude-50": "magnitude:sparsity=0.5",
    "sparsegpt-2:4": "sparsegpt:nm=2:4,sparsity=none",
    "wanda-2:4": "wanda:nm=2:4,sparsity=none",
    "magnitude-2:4": "magnitude:nm=2:4,sparsity=none",
    "svd-0.8": "svd:param_ratio=0.8",
    "asvd-0.8": "asvd:param_ratio=0.8",
    "svd-llm-0.8": "svd-llm:param_ratio=0.8",
    "svd-0.6": "svd:param_ratio=0.6",
    "asvd-0.6": "asvd:param_ratio=0.6",
    "svd-llm-0.6": "svd-llm:param_ratio=0.6",
}


def peer_recipe(name: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    targets = ["re:.*self_attn\\.(q|k|v|o)_proj$", "re:.*mlp\\.(gate|up|down)_proj$"]
    if name.startswith("gptq"):
        bits = int(name[6])
        scheme = {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}}
        return GPTQModifier(config_groups=scheme, ignore=["lm_head"], dampening_frac=0.01, block_size=128)
    structure = "2:4" if name.endswith("2:4") else "0:0"      # 0:0 = unstructured in llm-compressor
    cls = SparseGPTModifier if name.startswith("sparsegpt") else WandaPruningModifier
    return cls(sparsity=0.5, mask_structure=structure, targets=targets, ignore=["lm_head"])


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", choices=["llmpress", "llmcompressor", "floor"], required=True)
    ap.add_argument("--method")
    ap.add_argument("--model", required=True, help="dense HF folder")
    ap.add_argument("--tokens", required=True, help="safetensors file with `ids` (N, T)")
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmpress.data import eval_tokens
    from llmpress.eval import perplexity

    tokens = load_file(a.tokens)["ids"]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    result = {"tool": a.tool, "method": a.method, "torch_threads": torch.get_num_threads()}

    if a.tool == "floor":
        # two plain forward passes of the calibration tokens through the decoder (no lm_head), as
        # a sequential pipeline must do (statistics, then propagation), batch 8 like llmpress
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(2):
                for s in range(0, tokens.shape[0], 8):
                    model.model(tokens[s:s + 8], use_cache=False)
            result["seconds"] = time.perf_counter() - t
    elif a.tool == "llmpress":
        from llmpress.arch import adapter_for
        from llmpress.config import parse_method_spec
        from llmpress.pipeline import compress
        from llmpress.plan import Plan

        # NAME+onepass: every block's statistics from the dense model in one pass, no propagation
        name, _, mode = a.method.partition("+")
        plan = Plan.uniform(parse_method_spec(METHODS[name]))
        layer_configs = plan.resolve(adapter_for(model).linear_names(model))
        before = linear_weights(model)
        t = time.perf_counter()
        report = compress(model, layer_configs, tokens, progress=False, propagate=mode != "onepass")
        result["seconds"] = time.perf_counter() - t
        result["fallbacks"] = sum("fallback" in v for v in report.layers.values())
        after = {n: model.get_submodule(n).dense_weight() for n in before}
    else:
        from datasets import Dataset
        from llmcompressor import oneshot

        before = linear_weights(model)
        ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
        t = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=peer_recipe(a.method), num_calibration_samples=tokens.shape[0],
                max_seq_length=tokens.shape[1], shuffle_calibration_samples=False)
        result["seconds"] = time.perf_counter() - t
        after = linear_weights(model)   # GPTQ writes its dequantized result back into .weight

    if a.tool != "floor":
        changed = sum(not torch.equal(before[n], after[n].to(before[n].dtype)) for n in before)
        zeros = sum((after[n] == 0).sum().item() for n in before) / sum(w.numel() for w in before.values())
        result.update(layers=len(before), layers_changed=changed, zero_fraction=zeros)
        ids = eval_tokens(tokenizer, "wikitext2")
        result.update(perplexity(model, ids, 2048, a.max_windows, progress=False))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
