"""Issue 14 measurements on the embedded model (GPTQ W4 g128, calibration 64 x 512 `wikipedia`, seed 0).

1. Resume overhead: the same compression with and without per-block checkpoints, in one process;
   the seconds spent writing each checkpoint (block state + the next block's inputs, fsynced) against
   the seconds spent compressing that block.
2. Data-parallel calibration: `torchrun --nproc-per-node 2` (gloo, 1 thread each) against one
   process with 2 threads and one with 1 thread, each a fresh `llmpress compress` process; the bytes
   each rank all-reduced.

    .venv/bin/python bench/scale_out.py [--out bench/results/scale_out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress import GPTQ, Plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.checkpoint import Checkpoint, run_key  # noqa: E402
from llmpress.data import calibration_tokens  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402


def resume_overhead(scratch: Path) -> dict:
    dense, tok = load_model("smollm2-135m")
    tokens = calibration_tokens(tok, "wikipedia", 64, 512, seed=0)
    configs = Plan.uniform(GPTQ(bits=4, group_size=128)).resolve(adapter_for(dense).linear_names(dense))
    plain = copy.deepcopy(dense)
    t = time.perf_counter()
    compress(plain, configs, tokens, progress=False)
    plain_s = time.perf_counter() - t
    saves: list[float] = []
    original = Checkpoint.save_block

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        original(self, *a, **k)
        saves.append(time.perf_counter() - t0)
    Checkpoint.save_block = timed
    model = copy.deepcopy(dense)
    t = time.perf_counter()
    ck = Checkpoint(scratch, {"bench": 1}, run_key(model, tokens), resume=False)
    key_s = time.perf_counter() - t
    compress(model, configs, tokens, progress=False, checkpoint=ck)
    with_s = time.perf_counter() - t
    Checkpoint.save_block = original
    ck.remove()
    blocks = len(saves)
    return {"blocks": blocks, "compress_seconds_plain": plain_s, "compress_seconds_with_checkpoints": with_s,
            "run_key_seconds": key_s, "checkpoint_seconds_per_block": sum(saves) / blocks,
            "compress_seconds_per_block": plain_s / blocks,
            "checkpoint_over_compress_per_block": (sum(saves) / blocks) / (plain_s / blocks),
            "hidden_bytes_per_checkpoint": 64 * 512 * 576 * 4,
            "identical": all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))}


def processes(folder: Path) -> dict:
    out = {}
    runs = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes (gloo), 1 thread each": (2, 1)}
    for name, (nproc, threads) in runs.items():
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 \
            else [sys.executable]
        js = folder / f"p{nproc}t{threads}.json"
        cmd = [*launcher, "-m", "llmpress", "compress", "--model", "smollm2-135m", "--method", "gptq", "--bits", "4",
               "--group-size", "128", "--calib", "wikipedia", "--num-samples", "64", "--seq-len", "512",
               "--out", str(folder / f"p{nproc}t{threads}"), "--json", str(js)]
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        r = json.loads(js.read_text())
        out[name] = {"wall_seconds": time.perf_counter() - t, "compress_seconds": r["compress_seconds"],
                     "reduced_bytes_per_rank": r["reduced_bytes"], "reduced_bytes_per_block": r["reduced_bytes"] / 30}
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale_out.json"))
    ap.add_argument("--only", choices=["resume", "processes"])
    a = ap.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        if a.only in (None, "resume"):
            result["resume"] = resume_overhead(Path(tmp) / "ck")
            print(json.dumps(result["resume"], indent=1), flush=True)
        if a.only in (None, "processes"):
            result["processes"] = processes(Path(tmp))
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
