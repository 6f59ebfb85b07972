"""Two CPU processes on the gloo backend (torchrun) against one process: data-parallel calibration
gives the same model up to the order of floating-point sums."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _compress(model, out, text, nproc, *extra):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "llmpress", "compress", "--model", str(model), "--method", "gptq", "--bits", "4",
           "--group-size", "32", "--calib", str(text), "--num-samples", "8", "--seq-len", "32", "--out", str(out),
           "--json", str(out) + ".json", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra", [[], ["--sequential", "--reference", "0.25"]])
def test_two_gloo_processes_match_one(tiny_hf_dir, tmp_path, extra):
    """(with --reference the cross statistics (X_ref - X)^T X are summed across ranks too)"""
    from llmpress.models import load_model
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    one = _compress(tiny_hf_dir, tmp_path / "one", text, 1, *extra)
    assert one.returncode == 0, one.stderr
    two = _compress(tiny_hf_dir, tmp_path / "two", text, 2, *extra)
    assert two.returncode == 0, two.stderr
    result = json.loads((tmp_path / "two.json").read_text())
    # statistics of both blocks were summed across the two ranks: 4 Gram matrices per block
    grams = 2 * (3 * 64 * 64 + 128 * 128) * 4 * (2 if extra else 1)      # a cross matrix per Gram matrix
    assert result["processes"] == 2 and result["reduced_bytes"] >= grams
    a, _ = load_model(str(tmp_path / "one"), runtime="rebuild")
    b, _ = load_model(str(tmp_path / "two"), runtime="rebuild")
    qa = [m.int_weight() for m in a.modules() if hasattr(m, "int_weight")]
    qb = [m.int_weight() for m in b.modules() if hasattr(m, "int_weight")]
    assert len(qa) == 14
    same = sum((x == y).sum().item() for x, y in zip(qa, qb)) / sum(x.numel() for x in qa)
    assert same > 0.99                       # a few codes may flip on float32 sum order
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    la, lb = a(ids).logits, b(ids).logits
    assert (la - lb).abs().max() < 0.05 * la.abs().max()
