"""`llmpress demo`: the product's job end to end on the embedded model, in a few minutes on 2 cores.

A calibrated compression to one budget (average bits per weight, allocated across layers by the
knapsack over a measured sensitivity table of GPTQ 4-bit (groups of 64) and 8-bit (one scale per
row) options: both kinds run packed in llmpress's bf16 runtime), saved, exported to
compressed-tensors and reloaded by plain transformers, then measured against the dense model:
perplexity, bytes, decode speed and weight memory, both for transformers on the export (which
dequantizes at load) and for llmpress's own runtime (4-bit layers packed, bf16 activations).
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from llmpress.errors import LLMPressError


def run_demo(model_spec: str = "smollm2-135m", budget: str = "bits=4.5", dataset: str = "wikitext2",
             seq_len: int = 2048, max_windows: int = 4, num_samples: int = 16, calib_seq_len: int = 512,
             seed: int = 0, out: str | Path | None = None) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from llmpress import GPTQ
    from llmpress.arch import adapter_for
    from llmpress.budget import Budget, plan_for_budget
    from llmpress.data import calibration_tokens, eval_tokens
    from llmpress.eval import model_size, perplexity, speed, weight_bytes
    from llmpress.export import load_compressed, save_compressed
    from llmpress.formats import export_compressed_tensors
    from llmpress.models import load_model
    from llmpress.pipeline import compress

    target = Budget.parse(budget)
    dense, tokenizer = load_model(model_spec)
    ids = eval_tokens(tokenizer, dataset)
    calib_seq_len = min(calib_seq_len, getattr(dense.config, "max_position_embeddings", calib_seq_len))
    tokens = calibration_tokens(tokenizer, "wikipedia", num_samples, calib_seq_len, seed)
    # 4-bit in groups of 64 (divides 576 and 1536) and 8-bit with one group per row (a group as wide
    # as the widest input): both export to compressed-tensors and run packed under bf16
    widest = max(dense.get_submodule(n).in_features for n in adapter_for(dense).linear_names(dense))
    menu = [GPTQ(bits=4, group_size=64), GPTQ(bits=8, group_size=widest)]
    rows = []

    def measure(label, model, note, t_compress=None, bits=True):
        ppl = perplexity(model, ids, seq_len, max_windows, progress=False)
        sp = speed(model, prompt_len=128, decode_tokens=32, batch_sizes=(1,), repeats=2)
        rows.append({"label": label, "perplexity": ppl["perplexity"], "windows": ppl["windows"],
                     "bits_per_weight": model_size(model)["bits_per_weight"] if bits else None,
                     "weight_mib": weight_bytes(model) / 2**20,
                     "decode_tokens_per_s": sp["decode_tokens_per_s"], "compress_s": t_compress, "note": note})
        print(f"  measured: {label}", flush=True)

    print(f"dense {model_spec}, float32", flush=True)
    measure("dense (float32)", dense, "")
    t = time.perf_counter()
    allocation = plan_for_budget(dense, tokens, target, menu, "knapsack", sample_windows=min(4, num_samples))
    model = copy.deepcopy(dense)
    compress(model, allocation.plan.resolve(adapter_for(model).linear_names(model)), tokens)
    t_compress = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(out) if out else Path(tmp)
        native = save_compressed(model, tokenizer, work / "llmpress", {"source_model": model_spec,
                                                                       "allocation": allocation.info})
        ct = export_compressed_tensors(load_compressed(native)[0], tokenizer, work / "compressed-tensors")
        reloaded = AutoModelForCausalLM.from_pretrained(ct).eval()
        if not torch.equal(reloaded(ids[None, :64]).logits, model(ids[None, :64]).logits):
            raise LLMPressError("the compressed-tensors export does not reproduce llmpress's logits")
        disk = sum(f.stat().st_size for f in Path(ct).iterdir() if f.suffix == ".safetensors")
        measure(f"{budget} -> compressed-tensors, transformers", reloaded,
                f"{disk / 2**20:.0f} MiB on disk; transformers dequantizes at load", t_compress, bits=False)
        del reloaded
        packed, _ = load_compressed(native, dtype=torch.bfloat16)
        measure(f"{budget}, llmpress runtime (bf16, packed)", packed,
                "4-bit / 8-bit layers through torch's int4 / int8 kernels")
    print(f"\n{model_spec} on {dataset}: perplexity over {rows[0]['windows']} windows of {seq_len} tokens; "
          f"calibration {num_samples} x {calib_seq_len} `wikipedia`; allocation {allocation.info['allocator']} "
          f"at {budget} over GPTQ 4-bit g64 / 8-bit per row ({allocation.info['bits_per_weight']:.3f} bits/weight "
          f"planned; sensitivity table {allocation.info['sensitivity_table']})")
    if model_spec == "smollm2-135m":
        print("(the embedded model's weights went through GGUF Q4_1 once; comparisons stay valid)")
    w = max(len(r["label"]) for r in rows)
    print(f"{'model':<{w}} {'perplexity':>10} {'bits/weight':>11} {'weights MiB':>11} {'decode tok/s':>12} "
          f"{'compress s':>10}  note")
    for r in rows:
        cs = f"{r['compress_s']:.0f}" if r["compress_s"] else ""
        bits = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] is not None else "-"
        print(f"{r['label']:<{w}} {r['perplexity']:>10.3f} {bits:>11} {r['weight_mib']:>11.1f} "
              f"{r['decode_tokens_per_s']:>12.1f} {cs:>10}  {r['note']}")
    return rows
