"""SHA-256 over the dequantized weights of every compressed layer, to check that a code change left a
method's results unchanged: run it in two checkouts and compare the digests.

    .venv/bin/python bench/weights_digest.py [--method gptq:bits=4,group_size=64] [--num-samples 64]
    (in another checkout: PYTHONPATH=OTHER/src .venv/bin/python OTHER/bench/weights_digest.py ...)
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmpress import Plan  # noqa: E402
from llmpress.arch import adapter_for  # noqa: E402
from llmpress.config import parse_method_spec  # noqa: E402
from llmpress.data import calibration_tokens  # noqa: E402
from llmpress.models import load_model  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq:bits=4,group_size=64")
    ap.add_argument("--num-samples", type=int, default=64)
    a = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    tokens = calibration_tokens(tok, "wikipedia", a.num_samples, 512, seed=0)
    names = adapter_for(model).linear_names(model)
    compress(model, Plan.uniform(parse_method_spec(a.method)).resolve(names), tokens, progress=False)
    h = hashlib.sha256()
    for n in names:
        h.update(model.get_submodule(n).dense_weight().numpy().tobytes())
    print(f"{a.method} on {a.num_samples} x 512: {h.hexdigest()}")


if __name__ == "__main__":
    main()
