"""Issue 26: depth pruning (whole blocks) and width pruning (MLP neurons) against SparseGPT at the
same share of block-linear parameters removed, on the embedded SmolLM2-135M.

For each share (default 12.5 % and 25 % of the block linears' parameters):
- depth: round(share x L) blocks dropped, chosen by ShortGPT's block influence (`bi`), the
  contiguous span of least angular distance (`angular`) and the greedy calibration perplexity
  search (`ppl`, on the first --ppl-windows windows: it costs ~n L^2 / 2 block forwards);
- width: every MLP cut to the intermediate size that removes the same share (the MLP holds ~3/4
  of a block's linear parameters), rounded to 64, by structured OBS (`obs`) and the Wanda score (`wanda`),
  down_proj refit by least squares;
- SparseGPT unstructured at the same share (the quality reference: no runtime runs it faster).
Calibration: `wikipedia` 32 x 512, seed 0 (never the evaluation text). Measured: WikiText-2
perplexity (2048-token windows, first 20), the share actually removed, the seconds it took, and
decode tokens/s at batch 1 in transformers (float32, 2 threads) and in llama.cpp (F16 GGUF through
xllamacpp), each against the dense model in the same run.

    .venv/bin/python bench/structured_pruning.py [--shares 0.125,0.25] [--out bench/results/structured_pruning.json]
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

from llmpress import Plan, SparseGPT  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.depth import blocks_to_drop, choose_blocks, drop_blocks  # noqa: E402
from llmpress.eval import llamacpp_speed, perplexity, speed  # noqa: E402
from llmpress.gguf_export import export_gguf  # noqa: E402
from llmpress.models import load_model, resolve_source  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402
from llmpress.width import prune_width  # noqa: E402


def linear_params(model) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in adapter_for(model).linear_names(model))


def measure(model, ids, source, skip_speed: bool) -> dict:
    out = {"wikitext2_ppl": perplexity(model, ids, 2048, 20, progress=False)["perplexity"]}
    if skip_speed:
        return out
    out["decode_tokens_per_s"] = speed(model, batch_sizes=(1,))["decode_tokens_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        export_gguf(model, path, source_gguf=source, float_type="F16", copy_embeddings=False)
        out["llamacpp_decode_tokens_per_s"] = llamacpp_speed(path)["decode_tokens_per_s"]
        out["gguf_bytes"] = path.stat().st_size
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shares", default="0.125,0.25")
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--ppl-shares", default="0.125", help="shares at which the (slow) greedy perplexity search runs")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/structured_pruning.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    dense, tok = load_model("smollm2-135m")
    _, source = resolve_source("smollm2-135m")
    calib = calibration_tokens(tok, "wikipedia", 32, 512, seed=0)
    ids = eval_tokens(tok, "wikitext2")
    total = linear_params(dense)
    inter = dense.config.intermediate_size
    mlp_share = sum(dense.get_submodule(n).weight.numel() for n in adapter_for(dense).linear_names(dense)
                    if ".mlp." in n) / total
    rows = {"dense": {**measure(dense, ids, source, a.skip_speed), "removed_share": 0.0}}
    print("dense", rows["dense"], flush=True)
    for share in (float(s) for s in a.shares.split(",")):
        n_blocks = blocks_to_drop(dense, share)
        k = round((1 - share / mlp_share) * inter / 64) * 64
        variants = {f"depth bi {n_blocks} blocks": ("depth", "bi"),
                    f"depth angular {n_blocks} blocks": ("depth", "angular"),
                    **({f"depth ppl {n_blocks} blocks": ("depth", "ppl")}
                       if share in [float(x) for x in a.ppl_shares.split(",") if x] else {}),
                    f"width obs {k}": ("width", "obs"), f"width wanda {k}": ("width", "wanda"),
                    f"sparsegpt {share:.1%}": ("sparsegpt", None)}
        for name, (kind, criterion) in variants.items():
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            info = {}
            if kind == "depth":
                tokens = calib[:a.ppl_windows] if criterion == "ppl" else calib
                chosen, _ = choose_blocks(model, tokens, n_blocks, criterion, progress=False)
                info = drop_blocks(model, chosen)
            elif kind == "width":
                info = {k_: v for k_, v in prune_width(model, calib, k, criterion, progress=False).items()
                        if k_ != "relative_output_error"}
            else:
                names = adapter_for(model).linear_names(model)
                compress(model, Plan.uniform(SparseGPT(sparsity=share)).resolve(names), calib, progress=False)
            seconds = time.perf_counter() - t
            removed = share if kind == "sparsegpt" else 1 - linear_params(model) / total
            row = {"share": share, "removed_share": removed, "seconds": seconds, **info,
                   **measure(model, ids, source, a.skip_speed or kind == "sparsegpt")}
            for key in ("decode_tokens_per_s", "llamacpp_decode_tokens_per_s"):
                if key in row and key in rows["dense"]:
                    row[key.replace("tokens_per_s", "vs_dense")] = row[key] / rows["dense"][key]
            rows[f"{name} ({share:.1%})"] = row
            print(name, json.dumps(row), flush=True)
            del model
    result = {"date": time.strftime("%Y-%m-%d"), "model": "smollm2-135m", "calibration": "wikipedia 32 x 512 seed 0",
              "eval": "wikitext2 2048 x 20", "threads": torch.get_num_threads(), "rows": rows}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'variant':<40} {'removed':>8} {'ppl':>9} {'hf x':>6} {'l.cpp x':>7} {'s':>7}")
    for name, r in rows.items():
        print(f"{name:<40} {r['removed_share']:>8.1%} {r['wikitext2_ppl']:>9.2f} {r.get('decode_vs_dense', 1.0):>6.2f} "
              f"{r.get('llamacpp_decode_vs_dense', 1.0):>7.2f} {r.get('seconds', 0):>7.1f}")


if __name__ == "__main__":
    main()
