"""`llmpress {compress, eval, demo}`. Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmpress.errors import LLMPressError


def _add_eval_args(p, dataset_default="wikitext2"):
    p.add_argument("--dataset", default=dataset_default, help="wikitext2 or a local UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")


def _parser() -> argparse.ArgumentParser:
    from llmpress.modules import RUNTIMES
    from llmpress.recipe import add_device_options, add_options
    ap = argparse.ArgumentParser(prog="llmpress", description="Compress Hugging Face causal LMs.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    add_options(c, planning=False)
    p = sub.add_parser("plan", help="the allocation of a --budget (size, predicted loss), without compressing")
    add_options(p, planning=True)
    p.add_argument("--plan-out", help="write the allocated Plan here (compress --plan FILE runs it)")
    p.add_argument("--json", help="write the allocation here")

    e = sub.add_parser("eval", help="evaluate a model (perplexity unless only other evaluations are asked for)")
    e.add_argument("--model", required=True)
    _add_eval_args(e, dataset_default=None)
    e.add_argument("--tasks", help="zero-shot tasks, e.g. arc_easy,piqa (scored by lm-eval)")
    e.add_argument("--limit", type=int, help="first N documents per task")
    e.add_argument("--kl-base", help="base model to measure KL divergence and top-1 agreement against")
    e.add_argument("--kl-windows", type=int, default=4, help="windows of --seq-len tokens for KL (default 4)")
    e.add_argument("--speed", action="store_true", help="prefill / decode tokens/s, peak memory, layer timings "
                                                         "(with --kl-base: the base model's too, and the ratios)")
    e.add_argument("--gguf", nargs="+", metavar="FILE",
                   help="with --speed: also time these GGUF files in llama.cpp (pip install xllamacpp), e.g. the "
                        "exported model and an F32 / F16 export of the base; ratios against the first")
    e.add_argument("--runtime", choices=list(RUNTIMES),
                   help="how an llmpress folder's compressed layers run (default: dense for perplexity, KL and "
                        "zero-shot, i.e. the stored weights' exact numbers; fast for --speed: packed kernels, "
                        "float32 activations cast to bfloat16 inside them)")
    e.add_argument("--base-dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the --kl-base model (default float32: the dense reference)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json")
    e.add_argument("--trust-remote-code", action="store_true")
    add_device_options(e)

    w = sub.add_parser("sweep", help="methods x budgets on one model, evaluated, with report.md and plots")
    w.add_argument("--model", required=True)
    w.add_argument("--methods", required=True, help='e.g. "rtn:bits=4,magnitude:sparsity=0.5,svd:param_ratio=0.8"')
    _add_eval_args(w)
    w.add_argument("--tasks")
    w.add_argument("--limit", type=int)
    w.add_argument("--calib", default="wikipedia")
    w.add_argument("--num-samples", type=int, default=64)
    w.add_argument("--calib-seq-len", type=int, default=512)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--propagate", action="store_true",
                   help="re-collect statistics per run through the compressed blocks (slower)")
    w.add_argument("--out", required=True)
    w.add_argument("--overwrite", action="store_true")
    add_device_options(w)

    x = sub.add_parser("export", help="write an llmpress folder in a format that loads without llmpress")
    x.add_argument("dir", help="an llmpress output folder")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "gguf", "dense"],
                   help="compressed-tensors: pack-quantized (transformers, vLLM); gguf: llama.cpp (4/5/8-bit "
                        "symmetric group-32 layers as Q4_0/Q5_0/Q8_0, layers solved on a GGUF grid as that "
                        "type, others F32); dense: every layer merged back")
    x.add_argument("--out", required=True)
    x.add_argument("--embedding-type", choices=["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "F16", "F32"],
                   help="gguf: re-quantize the token embedding (and an untied output layer) to this type "
                        "(round to nearest) instead of copying the source's bytes / writing F32")
    x.add_argument("--adapter-out", help="gptq-lr layers: their quantized base goes into --out and their low-rank "
                                         "corrections here, as a PEFT LoRA adapter folder (compressed-tensors) or a "
                                         "GGUF LoRA adapter file (gguf)")

    v = sub.add_parser("verify", help="re-hash every file of an llmpress folder against its manifest")
    v.add_argument("dir")

    r = sub.add_parser("report", help="re-render report.md and plots from DIR/report.json")
    r.add_argument("dir")

    d = sub.add_parser("demo", help="the embedded model compressed to a budget, exported, reloaded and measured against dense")
    d.add_argument("--model", default="smollm2-135m")
    _add_eval_args(d)
    d.add_argument("--budget", default="bits=4.5", help="average bits per weight over GPTQ 4-bit g64 / 8-bit per-row options")
    d.add_argument("--num-samples", type=int, default=16, help="calibration windows of 512 tokens")
    d.add_argument("--out", help="keep the llmpress and compressed-tensors folders here (default: a temporary folder)")
    return ap


def _write_json(path, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _recipe_of(a, argv: list[str]):
    """The options this command line sets itself (not their defaults) over --recipe: one Recipe."""
    from llmpress.recipe import MACHINE, Recipe
    parser = _parser()
    sub = next(x for x in parser._actions if isinstance(x, argparse._SubParsersAction)).choices[a.command]
    for x in sub._actions:                 # the whole parser parses argv; only this subcommand's defaults go
        x.default = argparse.SUPPRESS
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if k not in MACHINE}
    return Recipe.resolve(a.recipe, **given)


def cmd_compress(a, argv: list[str]) -> dict:
    from llmpress.workflow import compress
    result = compress(a.model, a.out, _recipe_of(a, argv), device=a.device, offload=a.offload, resume=a.resume,
                      overwrite=a.overwrite, trust_remote_code=a.trust_remote_code)
    _write_json(a.json, result)
    return result


def cmd_plan(a, argv: list[str]) -> dict:
    from llmpress.workflow import plan
    result = plan(a.model, _recipe_of(a, argv), device=a.device, trust_remote_code=a.trust_remote_code)
    if a.plan_out:
        Path(a.plan_out).write_text(json.dumps(result["plan"], indent=2) + "\n")
        print(f"plan -> {a.plan_out} (llmpress compress --plan {a.plan_out} ...)")
    _write_json(a.json, result)
    return result


def cmd_eval(a) -> dict:
    from llmpress import eval as ev
    from llmpress.data import eval_tokens
    from llmpress.export import versions
    from llmpress.models import load_model

    import torch
    torch.manual_seed(a.seed)
    tasks = None
    if a.tasks:
        from llmpress.zeroshot import parse_tasks
        tasks = parse_tasks(a.tasks)                  # bad task names fail before loading
    from llmpress.walk import resolve_device, resolve_dtype
    if a.max_windows is not None and a.max_windows < 1:
        raise LLMPressError(f"--max-windows must be at least 1, got {a.max_windows}")
    if a.kl_windows < 1:
        raise LLMPressError(f"--kl-windows must be at least 1, got {a.kl_windows}")
    if a.seq_len < 2:
        raise LLMPressError(f"--seq-len must be at least 2, got {a.seq_len}")
    if a.gguf and not a.speed:
        raise LLMPressError("--gguf times files in llama.cpp: it goes with --speed")
    for path in a.gguf or ():
        if not Path(path).is_file():
            raise LLMPressError(f"--gguf {path}: no such file")
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    from llmpress.modules import set_runtime
    quality_runtime, speed_runtime = a.runtime or "dense", a.runtime or "fast"
    model, tokenizer = load_model(a.model, dtype=dtype, trust_remote_code=getattr(a, "trust_remote_code", False),
                                  runtime=quality_runtime)
    ev.check_context(model, a.seq_len)
    model.to(device)
    result = {"model": a.model, "seed": a.seed, "versions": versions(), **ev.model_size(model),
              "device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
              "runtime": {"quality": quality_runtime, **({"speed": speed_runtime} if a.speed else {})}}
    disk = ev.disk_bytes(a.model)
    if disk is not None:
        result["disk_bytes"] = disk
    dataset = a.dataset or (None if (tasks or a.kl_base or a.speed) else "wikitext2")
    if dataset:
        ids = eval_tokens(tokenizer, dataset)
        result.update(dataset=dataset, **ev.perplexity(model, ids, a.seq_len, a.max_windows))
        result["protocol"] = {"perplexity": "one string tokenized once, non-overlapping windows from token 0, "
                                            "exp(mean window loss)"}
        print(f"{a.model}: perplexity {result['perplexity']:.3f} on {dataset} ({result['windows']} of "
              f"{result['total_windows']} windows of {a.seq_len} tokens)")
    print(f"{a.model}: {result['bytes']:,} bytes in block linears, {result['bits_per_weight']:.3f} bits/weight")
    if tasks:
        from llmpress.zeroshot import evaluate_tasks
        zs = evaluate_tasks(model, tokenizer, tasks, limit=a.limit, seed=a.seed)
        result["tasks"] = {t: zs[t] for t in tasks}
        result.setdefault("protocol", {})["zero_shot"] = zs["protocol"]
        for t in tasks:
            r = zs[t]
            print(f"  {t:<14} acc {r['acc']:.4f}" + (f"  acc_norm {r['acc_norm']:.4f}" if "acc_norm" in r else "")
                  + f"  (n={r['n']})")
    if a.speed:                        # before a base model is loaded: peak memory is this model's
        set_runtime(model, speed_runtime)
        result.update(ev.speed(model))
        result["weight_bytes"] = ev.weight_bytes(model)
        result["layer_speed"] = ev.layer_speed(model)
        set_runtime(model, quality_runtime)
        print(f"  prefill {result['prefill_tokens_per_s']:.0f} tok/s, decode {result['decode_tokens_per_s']:.1f} tok/s "
              f"(batch 1); weights {result['weight_bytes'] / 2**20:.0f} MiB in memory, process peak "
              f"{result['peak_memory_bytes'] / 2**20:.0f} MiB")
    if a.kl_base:
        base, _ = load_model(a.kl_base, dtype=None if a.base_dtype == "auto" else getattr(torch, a.base_dtype),
                             runtime="dense")
        base.to(device)
        ids = eval_tokens(tokenizer, a.dataset or "wikitext2")
        result.update(ev.kl_to_base(model, base, ids, a.seq_len, a.kl_windows))
        result["kl_base"] = a.kl_base
        print(f"  KL to {a.kl_base}: {result['kl']:.5f} nats/token, top-1 agreement {result['top1_agreement']:.4f}")
        if a.speed:                    # the same measurement on the base model, in this run
            base_speed = ev.speed(base)
            result["base"] = {k: base_speed[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
            result["base"]["weight_bytes"] = ev.weight_bytes(base)
            result["decode_speedup"] = result["decode_tokens_per_s"] / base_speed["decode_tokens_per_s"]
            result["weight_memory_ratio"] = result["weight_bytes"] / result["base"]["weight_bytes"]
            print(f"  base: decode {base_speed['decode_tokens_per_s']:.1f} tok/s -> {result['decode_speedup']:.2f}x; "
                  f"weights in memory {result['weight_memory_ratio']:.2f}x the base's")
        del base
    if a.gguf:
        result["llamacpp"] = {}
        for path in a.gguf:
            r = ev.llamacpp_speed(path, threads=torch.get_num_threads())
            result["llamacpp"][str(path)] = r
            first = result["llamacpp"][str(a.gguf[0])]
            print(f"  llama.cpp {path}: prefill {r['prefill_tokens_per_s']:.0f} tok/s, decode "
                  f"{r['decode_tokens_per_s']:.1f} tok/s ({r['decode_tokens_per_s'] / first['decode_tokens_per_s']:.2f}x "
                  f"the first), {r['file_bytes'] / 2**20:.0f} MiB")
    _write_json(a.json, result)
    return result


def cmd_demo(a) -> None:
    from llmpress.demo import run_demo
    run_demo(a.model, budget=a.budget, dataset=a.dataset, seq_len=a.seq_len, max_windows=a.max_windows,
             num_samples=a.num_samples, out=a.out)


def cmd_sweep(a) -> None:
    from llmpress.sweep import parse_methods, run_sweep
    configs = parse_methods(a.methods)
    path = run_sweep(a.model, configs, Path(a.out), dataset=a.dataset, seq_len=a.seq_len,
                     max_windows=a.max_windows, tasks=a.tasks, limit=a.limit, calib=a.calib,
                     num_samples=a.num_samples, calib_seq_len=a.calib_seq_len, seed=a.seed,
                     propagate=a.propagate, overwrite=a.overwrite, device=a.device, dtype=a.dtype)
    print(path.read_text())


def cmd_export(a) -> None:
    from llmpress.formats import export_folder
    export_folder(a.dir, a.format, a.out, embedding_type=a.embedding_type, adapter_out=a.adapter_out)


def cmd_verify(a) -> None:
    from llmpress.export import verify
    m = verify(a.dir)
    print(f"{a.dir}: {len(m['files'])} files match the manifest (llmpress format {m['format_version']})")


def cmd_report(a) -> None:
    from llmpress.report import render
    if not (Path(a.dir) / "report.json").is_file():
        raise LLMPressError(f"{a.dir} has no report.json")
    print(render(a.dir).read_text())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    try:
        if a.command in ("compress", "plan"):          # flags -> one Recipe -> llmpress.workflow
            (cmd_compress if a.command == "compress" else cmd_plan)(a, argv)
        else:
            {"eval": cmd_eval, "demo": cmd_demo, "sweep": cmd_sweep, "report": cmd_report, "verify": cmd_verify,
             "export": cmd_export}[a.command](a)
    except LLMPressError as e:
        print(f"llmpress: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
