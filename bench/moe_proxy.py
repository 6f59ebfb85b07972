"""Issue 24 on real weights: the MoEfied SmolLM2 proxy (bench/moefy.py: a Mixtral folder, 8 experts
of 192 neurons, top-4) through llmpress's MoE paths, each row against the proxy itself, same
calibration (`wikipedia`, 64 x 512, seed 0; the proxy's router was fitted on seed-7 windows).

Rows: expert pruning 25 % (REAP, frequency) and expert merging 25 % (MC-SMoE), no quantization;
GPTQ W4 group 64 per expert with plain and with router-weighted statistics; GPTQ W4 g64 after
merging ("merge, then compress"). Measured: WikiText-2 perplexity (2048 x --windows), the block
linears' bits per weight, compress seconds.

    .venv/bin/python bench/moefy.py            # once: builds the proxy folder
    .venv/bin/python bench/moe_proxy.py [--rows prune-reap,...] [--out bench/results/moe_proxy.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress.data import eval_tokens  # noqa: E402
from llmpress.eval import perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.workflow import compress  # noqa: E402

W4 = {"method": "gptq", "bits": 4, "group_size": 64}
ROWS = {
    "prune-reap": {"prune_experts": 0.25, "expert_criterion": "reap"},
    "prune-frequency": {"prune_experts": 0.25, "expert_criterion": "frequency"},
    "merge-mc-smoe": {"merge_experts": 0.25},
    "gptq-w4g64": W4,
    "gptq-w4g64-router-weighted": {**W4, "router_weighted_stats": True},
    "merge-then-gptq-w4g64": {"merge_experts": 0.25, **W4},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", default=str(ROOT / "bench/.cache/smollm2-moe-8x192-top4"))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench/results/moe_proxy.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    if not Path(a.proxy).is_dir():
        raise SystemExit(f"{a.proxy}: build it first with bench/moefy.py")
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    proxy, tok = load_model(a.proxy, runtime="rebuild")
    ids = eval_tokens(tok, "wikitext2")
    rows = results.setdefault("rows", {})
    if "proxy" not in rows:
        rows["proxy"] = {"wikitext2_ppl": perplexity(proxy, ids, 2048, a.windows, progress=False)["perplexity"]}
    del proxy
    for label in a.rows.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            r = compress(a.proxy, Path(tmp) / "o", None, calib="wikipedia", num_samples=64, seq_len=512, **ROWS[label])
            seconds = time.perf_counter() - t
            model, _ = load_model(str(Path(tmp) / "o"), runtime="dense")
            rows[label] = {"fields": ROWS[label], "seconds": seconds, "bits_per_weight": r["bits_per_weight"],
                           "wikitext2_ppl": perplexity(model, ids, 2048, a.windows, progress=False)["perplexity"]}
        print(label, json.dumps(rows[label]), flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
