"""Resume after a kill: a compress run killed with SIGKILL after its k-th block continues from the
first unfinished block and writes a model bit-identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmpress.checkpoint import KILL_ENV

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _compress(model, out, text, *extra, kill_after=None):
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop(KILL_ENV, None)
    if kill_after is not None:
        env[KILL_ENV] = str(kill_after)
    cmd = [sys.executable, "-m", "llmpress", "compress", "--model", str(model), "--method", "gptq", "--bits", "3",
           "--group-size", "32", "--calib", str(text), "--num-samples", "6", "--seq-len", "32", "--out", str(out),
           *map(str, extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def sharded(tmp_path, tiny_tokenizer):
    from conftest import tiny_llama
    path = tmp_path / "tiny4"
    tiny_llama(layers=4).save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(path)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return path, text


@pytest.mark.parametrize("offload,options", [(False, []), (True, []),
                                             (False, ["--sequential", "--reference", "0.25"])])
def test_killed_run_resumes_bit_identical(sharded, tmp_path, offload, options):
    """(with --reference the checkpoint also carries the uncompressed model's hidden states)"""
    model, text = sharded
    extra = (["--offload", tmp_path / "scratch"] if offload else []) + options
    ref = _compress(model, tmp_path / "ref", text, *(["--offload", tmp_path / "scratch-ref"] if offload else []), *options)
    assert ref.returncode == 0, ref.stderr
    killed = _compress(model, tmp_path / "out", text, *extra, kill_after=1)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    folder = tmp_path / "scratch" if offload else tmp_path / ".out.partial"
    state = json.loads((folder / "run.json").read_text())
    assert state["done"] == 2
    # a block file written after the last record (a kill between the two) is redone, not trusted
    (folder / "block-00002.safetensors").write_bytes(b"half-written")
    resumed = _compress(model, tmp_path / "out", text, *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "2 blocks already compressed" in resumed.stderr
    assert (tmp_path / "out" / "llmpress.safetensors").read_bytes() == (tmp_path / "ref" / "llmpress.safetensors").read_bytes()
    assert not (folder / "run.json").exists()                 # cleaned up after the save
    manifest = json.loads((tmp_path / "out" / "llmpress.json").read_text())
    assert set(manifest["report"]) == set(json.loads((tmp_path / "ref" / "llmpress.json").read_text())["report"])


def test_resume_refuses_other_settings_and_damaged_files(sharded, tmp_path):
    model, text = sharded
    killed = _compress(model, tmp_path / "out", text, kill_after=0)
    assert killed.returncode == -signal.SIGKILL
    other = _compress(model, tmp_path / "out", text, "--bits", "4", "--resume")
    assert other.returncode == 2 and "different settings" in other.stderr and "bits" in other.stderr
    data = _compress(model, tmp_path / "out", text, "--seed", "1", "--resume")
    assert data.returncode == 2 and ("calibration" in data.stderr)
    block = tmp_path / ".out.partial" / "block-00000.safetensors"
    block.write_bytes(block.read_bytes()[:-10])               # a recorded file damaged afterwards
    damaged = _compress(model, tmp_path / "out", text, "--resume")
    assert damaged.returncode == 2 and "damaged" in damaged.stderr
    nothing = _compress(model, tmp_path / "other", text, "--resume")
    assert nothing.returncode == 2 and "nothing to resume" in nothing.stderr


def test_killed_sensitivity_table_keeps_its_finished_blocks(sharded, tmp_path):
    """`--budget`: the table run killed after block 1 resumes at block 2 and gives the same table."""
    model, text = sharded

    def budget_run(out, table, kill_after=None):
        # the reference's rows in a cache of their own: the killed run must measure
        env = {**os.environ, "PYTHONPATH": SRC, "LLMPRESS_CACHE": str(tmp_path / f"cache-{out.name}")}
        env.pop(KILL_ENV, None)
        if kill_after is not None:
            env[KILL_ENV] = str(kill_after)
        cmd = [sys.executable, "-m", "llmpress", "compress", "--model", str(model), "--budget", "bits=5",
               "--menu", "rtn,magnitude", "--calib", str(text), "--num-samples", "6", "--seq-len", "32",
               "--sample-windows", "2", "--sensitivity", str(table), "--out", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    ref = budget_run(tmp_path / "ref", tmp_path / "ref-table.json")
    assert ref.returncode == 0, ref.stderr
    killed = budget_run(tmp_path / "out", tmp_path / "table.json", kill_after=1)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "table.json").exists()
    assert json.loads((tmp_path / "table.json.partial" / "run.json").read_text())["done"] == 2
    resumed = budget_run(tmp_path / "out", tmp_path / "table.json")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at block 2" in resumed.stdout
    assert json.loads((tmp_path / "table.json").read_text())["layers"] == \
        json.loads((tmp_path / "ref-table.json").read_text())["layers"]
    assert not (tmp_path / "table.json.partial").exists()
