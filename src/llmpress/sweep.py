"""A sweep: several methods x budgets on one model, statistics computed once, every run evaluated,
results written to report.json and rendered by llmpress.report."""
from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

from llmpress.config import MethodConfig, parse_method_spec
from llmpress.errors import LLMPressError

_METHOD_START = re.compile(r"^[a-z][a-z0-9-]*(:|$)")


def parse_methods(spec: str) -> list[MethodConfig]:
    """'rtn:bits=4,magnitude:sparsity=0.5,svd:param_ratio=0.8' -> configs. A comma-separated item
    starts a new method when it begins with `name:` or is a bare name (`nm=2:4` stays an option)."""
    items, current = [], []
    for token in filter(None, (t.strip() for t in re.split(r"[,;]", spec))):
        starts = _METHOD_START.match(token) and ("=" not in token or token.index(":") < token.index("="))
        if starts and current:
            items.append(current)
            current = []
        current.append(token)
    if current:
        items.append(current)
    if not items:
        raise LLMPressError("--methods is empty")
    return [parse_method_spec(item[0] + ("," if len(item) > 1 else "") + ",".join(item[1:])) for item in items]


def layer_details(model, adapter) -> dict[str, dict]:
    from llmpress.modules import LowRankLinear, SparseLinear, linear_bytes, linear_params
    out = {}
    for name in adapter.linear_names(model):
        m = model.get_submodule(name)
        params = linear_params(m)
        if isinstance(m, SparseLinear):
            kept = m.values.numel() / params
        elif isinstance(m, LowRankLinear):
            kept = m.rank * (m.in_features + m.out_features) / params
        else:
            kept = 1.0
        out[name] = {"kept_params": kept, "bits_per_weight": 8 * linear_bytes(m) / params}
    return out


def run_sweep(model_spec: str, configs: list[MethodConfig], out: Path, *, dataset="wikitext2", seq_len=2048,
              max_windows=20, tasks=None, limit=None, calib="wikipedia", num_samples=64, calib_seq_len=512,
              seed=0, propagate=False, overwrite=False, device="cpu", dtype="auto") -> Path:
    from llmpress.arch import adapter_for
    from llmpress.data import calibration_tokens, eval_tokens
    from llmpress.eval import model_size, perplexity
    from llmpress.export import versions
    from llmpress.models import load_model
    from llmpress.pipeline import compress
    from llmpress.plan import Plan
    from llmpress.report import render
    from llmpress.walk import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LLMPressError(f"{out} exists and is not empty; pass --overwrite")
    if tasks:
        from llmpress.zeroshot import evaluate_tasks, parse_tasks
        tasks = parse_tasks(tasks)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dense, tokenizer = load_model(model_spec, dtype=dtype)
    adapter = adapter_for(dense)
    names = adapter.linear_names(dense)
    ids = eval_tokens(tokenizer, dataset)
    tokens = calibration_tokens(tokenizer, calib, num_samples, calib_seq_len, seed)

    def evaluate(model) -> dict:
        model.to(device)
        try:
            r = {**model_size(model), **perplexity(model, ids, seq_len, max_windows)}
            if tasks:
                zs = evaluate_tasks(model, tokenizer, tasks, limit=limit, seed=seed)
                r["tasks"] = {t: zs[t] for t in tasks}
        finally:
            model.to("cpu")
        return r

    def save() -> None:   # after every run, so an interrupted sweep keeps what it measured
        _write(out, model_spec, runs, tasks, seq_len, num_samples, calib_seq_len, calib, seed, propagate,
               versions(), time.perf_counter() - t_start)

    runs = [{"label": "dense", "family": "dense", "config": None, **evaluate(dense)}]
    save()
    stats_dir = out / "stats"
    for config in configs:
        model = copy.deepcopy(dense)
        plan = Plan.uniform(config)
        # statistics of the dense model, computed by the first run and read back by the others
        report = compress(model, plan.resolve(names), tokens, propagate=propagate, measure_error=True,
                          stats_cache=None if propagate else stats_dir, device=device)
        layers = layer_details(model, adapter)
        for fqn, info in report.layers.items():
            layers[fqn].update({k: v for k, v in info.items() if k in ("output_error", "rank", "fallback")})
        runs.append({"label": config.label(), "family": config.family, "config": config.to_dict(),
                     "compress_seconds": report.seconds, "layers": layers, **evaluate(model)})
        print(f"{config.label()}: perplexity {runs[-1]['perplexity']:.3f}, {runs[-1]['bits_per_weight']:.3f} bits/weight",
              flush=True)
        del model
        save()
    return render(out)


def _write(out, model_spec, runs, tasks, seq_len, num_samples, calib_seq_len, calib, seed, propagate,
           vers, seconds) -> None:
    note = ("The embedded SmolLM2-135M's weights went through GGUF Q4_1 once; method comparisons stay valid, "
            "but asymmetric 4-bit group-32 rounding reproduces it exactly.") if model_spec == "smollm2-135m" else ""
    data = {"model": model_spec, "seq_len": seq_len, "windows": runs[0]["windows"], "tasks": tasks,
            "calibration": {"source": calib, "num_samples": num_samples, "seq_len": calib_seq_len, "seed": seed,
                            "statistics": "propagated per run" if propagate else "dense model, one pass, cached"},
            "runs": runs, "versions": vers, "sweep_seconds": seconds, "note": note}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / "report.json")
