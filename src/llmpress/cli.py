"""`llmpress {compress, eval, demo}`. Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmpress.errors import LLMPressError


def _add_eval_args(p):
    p.add_argument("--dataset", default="wikitext2", help="wikitext2 or a local UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmpress", description="Compress Hugging Face causal LMs.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    c.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, llmpress folder or smollm2-135m")
    c.add_argument("--method", help="method name (see --plan for per-layer choices)")
    c.add_argument("--plan", help="Plan JSON file (instead of --method)")
    c.add_argument("--bits", type=int)
    c.add_argument("--group-size", type=int)
    c.add_argument("--asymmetric", action="store_true", help="asymmetric quantization grid (zero points)")
    c.add_argument("--sparsity", type=float)
    c.add_argument("--nm", help="N:M structured sparsity, e.g. 2:4")
    c.add_argument("--param-ratio", type=float)
    c.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing Hessian diagonal")
    c.add_argument("--damp", type=float, help="GPTQ / SparseGPT: relative Hessian damping (default 0.01)")
    c.add_argument("--alpha", type=float, help="ASVD: activation scaling exponent (default 0.5)")
    c.add_argument("--calib", default="wikipedia", help="calibration source: wikipedia, c4, wikitext2-train or a file")
    c.add_argument("--num-samples", type=int, default=128)
    c.add_argument("--seq-len", type=int, default=2048, help="calibration window length")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--one-pass", action="store_true",
                   help="statistics from the dense model in one forward per block (faster, no error propagation)")
    c.add_argument("--stats-cache", help="folder caching one-pass statistics for reuse (implies --one-pass)")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", help="write the run's results here")
    c.add_argument("--trust-remote-code", action="store_true")

    e = sub.add_parser("eval", help="evaluate a model")
    e.add_argument("--model", required=True)
    _add_eval_args(e)
    e.add_argument("--json")
    e.add_argument("--trust-remote-code", action="store_true")

    d = sub.add_parser("demo", help="one method of each family on the embedded model, at ~8 bits per weight")
    d.add_argument("--model", default="smollm2-135m")
    _add_eval_args(d)
    return ap


def _config_from_args(a):
    from llmpress.config import config_from_dict
    opts = {"bits": a.bits, "group_size": a.group_size, "sparsity": a.sparsity, "nm": a.nm,
            "param_ratio": a.param_ratio, "damp": a.damp, "alpha": a.alpha}
    kwargs = {k: v for k, v in opts.items() if v is not None}
    if a.asymmetric:
        kwargs["symmetric"] = False
    if a.act_order:
        kwargs["act_order"] = True
    if a.nm is not None:
        kwargs.setdefault("sparsity", None)
    return config_from_dict({"method": a.method, **kwargs})


def _write_json(path, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def cmd_compress(a) -> dict:
    from llmpress.arch import adapter_for
    from llmpress.export import check_out_dir, save_compressed
    from llmpress.plan import Plan

    if (a.method is None) == (a.plan is None):
        raise LLMPressError("give exactly one of --method or --plan")
    plan = Plan.load(a.plan) if a.plan else Plan.uniform(_config_from_args(a))
    check_out_dir(a.out, a.overwrite)
    from llmpress.models import load_model
    from llmpress.pipeline import compress
    from llmpress.data import calibration_tokens
    from llmpress.eval import model_size

    model, tokenizer = load_model(a.model, trust_remote_code=a.trust_remote_code)
    layer_configs = plan.resolve(adapter_for(model).linear_names(model))
    tokens = None
    calib = None
    if any(c.stat for c in layer_configs.values()):
        tokens = calibration_tokens(tokenizer, a.calib, a.num_samples, a.seq_len, a.seed)
        calib = {"source": a.calib, "num_samples": a.num_samples, "seq_len": a.seq_len, "seed": a.seed}
    one_pass = a.one_pass or a.stats_cache is not None
    report = compress(model, layer_configs, tokens, propagate=not one_pass, stats_cache=a.stats_cache)
    if calib:
        calib["propagate"] = not one_pass
    fallbacks = {k: v for k, v in report.layers.items() if "fallback" in v}
    for fqn, info in fallbacks.items():
        print(f"warning: {fqn}: fell back to {info['fallback']} ({info['reason']})", file=sys.stderr)
    size = model_size(model)
    manifest = {"source_model": a.model, "plan": plan.to_dict(),
                "layers": {k: v.to_dict() for k, v in layer_configs.items()},
                "calibration": calib, "seed": a.seed, "report": report.layers, "size": size}
    out = save_compressed(model, tokenizer, a.out, manifest, overwrite=a.overwrite)
    result = {"out": str(out), "compress_seconds": report.seconds, **size, "calibration": calib,
              "fallbacks": fallbacks}
    print(f"compressed {len(layer_configs)} layers in {report.seconds:.1f}s: {size['bytes']:,} bytes, "
          f"{size['bits_per_weight']:.3f} bits/weight -> {out}")
    _write_json(a.json, result)
    return result


def cmd_eval(a) -> dict:
    from llmpress.data import eval_tokens
    from llmpress.eval import model_size, perplexity
    from llmpress.models import load_model

    model, tokenizer = load_model(a.model, trust_remote_code=getattr(a, "trust_remote_code", False))
    ids = eval_tokens(tokenizer, a.dataset)
    result = {"model": a.model, "dataset": a.dataset, **perplexity(model, ids, a.seq_len, a.max_windows),
              **model_size(model)}
    print(f"{a.model}: perplexity {result['perplexity']:.3f} on {a.dataset} ({result['windows']} of "
          f"{result['total_windows']} windows of {a.seq_len} tokens); {result['bytes']:,} bytes, "
          f"{result['bits_per_weight']:.3f} bits/weight")
    _write_json(a.json, result)
    return result


def cmd_demo(a) -> None:
    import copy
    from llmpress.arch import adapter_for
    from llmpress.data import eval_tokens
    from llmpress.eval import model_size, perplexity
    from llmpress.methods.lowrank import SVD
    from llmpress.methods.magnitude import Magnitude
    from llmpress.methods.rtn import RTN
    from llmpress.models import load_model
    from llmpress.pipeline import compress
    from llmpress.plan import Plan

    dense, tokenizer = load_model(a.model)
    ids = eval_tokens(tokenizer, a.dataset)
    # One method per family at a comparable size, about 8-9 bits per weight (fp16 scales / values /
    # factors): 8-bit RTN (8.25), 50 % magnitude (16 * 0.5 + 1-bit mask = 9), SVD at half the params (8).
    configs = [RTN(bits=8, group_size=128), Magnitude(sparsity=0.5), SVD(param_ratio=0.5)]
    rows = [("dense (fp32)", model_size(dense), perplexity(dense, ids, a.seq_len, a.max_windows), 0.0)]
    for config in configs:
        model = copy.deepcopy(dense)
        report = compress(model, Plan.uniform(config).resolve(adapter_for(model).linear_names(model)))
        rows.append((config.label(), model_size(model), perplexity(model, ids, a.seq_len, a.max_windows), report.seconds))
        del model
    print(f"\n{a.model} on {a.dataset}, seq_len {a.seq_len}, {rows[0][2]['windows']} windows "
          f"(the embedded model's weights went through GGUF Q4_1 once)")
    print(f"{'method':<36} {'bytes':>12} {'bits/weight':>11} {'perplexity':>10} {'compress s':>10}")
    for label, size, ppl, secs in rows:
        print(f"{label:<36} {size['bytes']:>12,} {size['bits_per_weight']:>11.3f} {ppl['perplexity']:>10.3f} {secs:>10.1f}")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        {"compress": cmd_compress, "eval": cmd_eval, "demo": cmd_demo}[a.command](a)
    except LLMPressError as e:
        print(f"llmpress: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
