"""bench/gpu.py, the prepared GPU check, keeps working without a GPU (its --tiny mode on the CPU)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    run = rows["runs"][0]
    assert run["seconds"] > 0 and run["floor_seconds"] > 0 and run["vs_floor"] == run["seconds"] / run["floor_seconds"]
    assert rows["equality"]["share_of_equal_weights"] == 1.0
