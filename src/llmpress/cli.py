"""`llmpress {compress, eval, demo}`. Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from llmpress.errors import LLMPressError


def _add_eval_args(p, dataset_default="wikitext2"):
    p.add_argument("--dataset", default=dataset_default, help="wikitext2 or a local UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")


def _add_device_args(p):
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (a GPU when there is one); default cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype of the model (auto: the checkpoint's own; GGUF dequantizes to float32)")


def _add_compress_args(c, planning: bool) -> None:
    """The options of `compress` (and of `plan`, which stops after the allocation: no --out)."""
    from llmpress.recipe import PRESETS
    from llmpress.targets import TARGETS
    c.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file, llmpress folder or smollm2-135m")
    c.add_argument("--target", default="llmpress", choices=TARGETS,
                   help="where the model will run: the --budget default recipe, what the plan may hold and the "
                        "export written at the end follow from it (default llmpress: everything)")
    c.add_argument("--recipe", metavar="FILE|PRESET",
                   help="a recipe (JSON or YAML of compress options; an output's llmpress.json re-runs its recipe) "
                        "or a preset (" + ", ".join(sorted(PRESETS)) + "); flags given here override its fields")
    c.add_argument("--method", help="method name (see --plan for per-layer choices)")
    c.add_argument("--plan", help="Plan JSON file (instead of --method)")
    c.add_argument("--bits", type=_number, help="bits per weight (gptq-vq: a multiple of 1/dim, e.g. 2.5)")
    c.add_argument("--group-size", type=int)
    c.add_argument("--terms", type=int, help="series: low-bit terms in the expansion (each quantizes the residual)")
    c.add_argument("--asymmetric", action="store_true", help="asymmetric quantization grid (zero points)")
    c.add_argument("--sparsity", type=float)
    c.add_argument("--nm", help="N:M structured sparsity, e.g. 2:4")
    c.add_argument("--param-ratio", type=float)
    c.add_argument("--rank", type=int, help="gptq-lr: rank of the low-rank correction")
    c.add_argument("--dim", type=int, help="gptq-vq: weights per vector (default 2)")
    c.add_argument("--rows", type=int, help="gptq-vq: rows sharing one codebook (default 256)")
    c.add_argument("--clip", choices=["mse", "search"],
                   help="RTN / GPTQ / AWQ: mse: search each group's clipping range; search: llama.cpp's "
                        "importance-weighted signed scale search (symmetric grids: all 2^b levels used)")
    c.add_argument("--gguf-type", choices=["q4_1", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs",
                                                  "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"],
                   help="RTN / AWQ / GPTQ: quantize onto this llama.cpp block grid (fixes bits and group size; "
                        "--format gguf then writes these bytes as they are)")
    c.add_argument("--gguf-fallback", metavar="llama.cpp|TYPE",
                   help="layers whose rows a GGUF grid of the plan cannot take (not whole 256-weight blocks) get "
                        "the same method on this 32-block grid instead (llama.cpp: llama-quantize's own choice, "
                        "e.g. Q3_K -> Q4_0, IQ4_XS -> IQ4_NL); reported. Without it such a plan is refused")
    c.add_argument("--rotate", choices=["hadamard", "random"],
                   help="fold an orthogonal rotation of the residual stream (and per-head v/o) into the weights "
                        "before compressing (QuaRot-style incoherence; the model's function is unchanged)")
    c.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation's random signs / matrix")
    c.add_argument("--rotate-search", type=int, metavar="N",
                   help="try N seeds from --rotate-seed on and keep the one with the smallest measured quantization "
                        "output error (3-bit per-channel RTN over every layer, on the calibration data)")
    c.add_argument("--online-hadamard", metavar="LAYERS",
                   help="comma-separated block linears (e.g. mlp.down_proj,self_attn.o_proj) that get a Hadamard "
                        "rotation of their input at run time (QuaRot's R4): incoherent weights for the quantizer, at the "
                        "cost of a runtime op (about half a float32 down_proj here); such layers export dense to "
                        "compressed-tensors / GGUF")
    c.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing Hessian diagonal")
    c.add_argument("--damp", type=float, help="GPTQ / SparseGPT: relative Hessian damping (default 0.01)")
    c.add_argument("--refine", type=int, metavar="SWEEPS",
                   help="GPTQ: coordinate-descent sweeps over the columns after the GPTQ pass (QuantEase; same grid, "
                        "never a higher layer error; about as costly per sweep as GPTQ itself)")
    c.add_argument("--refit", type=int, metavar="ROUNDS",
                   help="GPTQ (uniform grids): re-fit every group's scale jointly to the chosen codes in the Hessian "
                        "metric, then sweep again on those scales, ROUNDS times at most (kept while the error falls)")
    c.add_argument("--alpha", type=float, help="ASVD: activation scaling exponent (default 0.5)")
    c.add_argument("--calib", default="wikipedia", help="calibration source: wikipedia, c4, wikitext2-train or a file")
    c.add_argument("--num-samples", type=int, default=128)
    c.add_argument("--seq-len", type=int, default=2048, help="calibration window length")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--budget", help="one global budget: params=F (fraction kept), bits=F (average) or bytes=N")
    c.add_argument("--menu", help="methods the allocator may mix, e.g. gptq,sparsegpt,svd-llm "
                                  "(default: sparsegpt,svd-llm for params, gptq,sparsegpt,svd-llm otherwise)")
    c.add_argument("--allocator", default="knapsack", choices=["knapsack", "lagrange", "search", "refine"],
                   help="knapsack / lagrange: from the sensitivity table alone (seconds); search: random "
                        "moves kept when the loss falls; refine: the knapsack choice re-solved on in-context "
                        "KLs measured for every layer's neighbouring options (minutes per round)")
    c.add_argument("--sensitivity", help="sensitivity table JSON: read if it exists for this model, data and "
                                         "menu; written otherwise (default: under $LLMPRESS_CACHE or ~/.cache/llmpress)")
    c.add_argument("--sample-windows", type=int, help="calibration windows the sensitivity is measured on "
                                                         "(default: 16, or all when there are fewer)")
    c.add_argument("--fuse", action="store_true",
                   help="layers that serving engines fuse (q/k/v, gate/up) share one choice (knapsack, lagrange)")
    c.add_argument("--search-steps", type=int, default=40)
    c.add_argument("--refine-rounds", type=int, default=1)
    c.add_argument("--one-pass", action="store_true",
                   help="statistics from the dense model in one forward per block (faster, no error propagation)")
    c.add_argument("--stats-cache", help="folder caching one-pass statistics for reuse (implies --one-pass)")
    c.add_argument("--sequential", action="store_true",
                   help="measure each input group of a block (q/k/v, o, gate/up, down) after the groups before it "
                        "were compressed (the GPTQ code's true-sequential; a partial forward per group)")
    c.add_argument("--reference", type=float, default=0.0, metavar="ALPHA",
                   help="asymmetric calibration (GPTAQ): fit Gram-matrix methods (gptq, sparsegpt, awq, gptq-lr, "
                        "svd-llm) this share of the way to the UNCOMPRESSED model's outputs, through a second "
                        "stream of hidden states (GPTAQ's code: 0.25; 0 = off)")
    c.add_argument("--tune", type=int, default=0, metavar="EPOCHS",
                   help="after each block is quantized, fit its quantized layers' scales and its norm weights to the "
                        "uncompressed block's outputs by gradient descent for EPOCHS passes over the calibration "
                        "windows (OmniQuant / Norm Tweaking; codes and format unchanged; 0 = off)")
    c.add_argument("--recover", type=int, metavar="STEPS",
                   help="after compressing, fine-tune the low-rank adapters (apiq, gptq-lr, oats layers) end to end for "
                        "STEPS AdamW steps of next-token loss on the calibration windows, every other weight frozen "
                        "(QLoRA / ApiQ's fine-tuning; 1/8 of the windows held out to check it helped)")
    c.add_argument("--recover-lr", type=float, default=3e-4, help="learning rate of --recover (ApiQ's: 3e-4)")
    c.add_argument("--recover-batch", type=int, default=4, help="windows per --recover step")
    c.add_argument("--prune-experts", type=float, metavar="SHARE",
                   help="mixtures of experts: before compressing, remove this share of every layer's routed experts, "
                        "the lowest by --expert-criterion on the calibration tokens (a standard config with fewer experts)")
    c.add_argument("--expert-criterion", default="reap", choices=["reap", "frequency"],
                   help="expert pruning score: reap (mean router weight x expert output norm over routed tokens, "
                        "REAP) or frequency (routed token count)")
    c.add_argument("--drop-blocks", type=int, metavar="N",
                   help="before compressing, remove N whole decoder blocks chosen by --block-criterion on the "
                        "calibration tokens (a standard config with fewer layers; alone, without a method, too)")
    c.add_argument("--block-criterion", default="bi", choices=["bi", "angular", "ppl"],
                   help="which blocks to drop: bi (ShortGPT's 1 - cos(input, output), the N lowest), angular (the "
                        "contiguous N blocks of least angular distance, Gromov et al.), ppl (greedy, least calibration "
                        "perplexity after each removal, BlockPruner's search; about N x L^2 / 2 block forwards)")
    c.add_argument("--prune-width", type=float, metavar="SHARE",
                   help="before compressing, remove this share of every MLP's intermediate neurons (same count in "
                        "every block: a standard config with a smaller intermediate_size), down_proj refit by least squares")
    c.add_argument("--width-criterion", default="obs", choices=["obs", "wanda"],
                   help="which neurons go: obs (structured Optimal Brain Surgeon on down_proj's columns) or wanda "
                        "(||W_:,j||^2 x E[h_j^2]); both refit down_proj on the kept neurons")
    c.add_argument("--width-multiple", type=int, default=64, metavar="M",
                   help="the kept intermediate size is rounded to a multiple of M (256 for llama.cpp's K-quant "
                        "rows of down_proj)")
    c.add_argument("--share-basis", type=int, metavar="N",
                   help="Basis Sharing (Wang et al., ICLR 2025): compress every block linear by low rank, q/k/v/gate/up "
                        "with one whitened-SVD basis per projection shared by N consecutive blocks (stored once), "
                        "o/down with their own (SVD-LLM); alone, without a method")
    c.add_argument("--share-search", action="store_true",
                   help="--share-basis N: choose, per projection type, which consecutive blocks share (runs of 1 to N "
                        "blocks, the least calibration output error; blocks where sharing loses keep their own basis)")
    c.add_argument("--share-ratio", type=float, default=0.8, metavar="R",
                   help="--share-basis: the share of the block linears' parameters kept (0.8 = 20%% compression)")
    c.add_argument("--calibrate-all-experts", action="store_true",
                   help="mixtures of experts: run every expert on every calibration token for its statistics, while "
                        "each block's outputs still add only the routed experts (E / k times the expert compute)")
    c.add_argument("--min-expert-tokens", type=int, default=128, metavar="N",
                   help="mixtures of experts: an expert routed fewer than N calibration tokens has its statistics "
                        "damped toward isotropic ones (none: the data-free solution); recorded per expert")
    c.add_argument("--trust-remote-code", action="store_true")
    _add_device_args(c)
    if planning:
        return
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", help="write the run's results here")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (killed, crashed) from its first unfinished block; the "
                        "settings, model and calibration data must be the same")
    c.add_argument("--offload", metavar="DIR",
                   help="larger than memory: read each block from the checkpoint's safetensors shards when its turn "
                        "comes and write it, compressed, to DIR (Hugging Face folders only; chosen automatically, "
                        "in a temporary folder, when the model does not fit in available memory)")


def _parser() -> argparse.ArgumentParser:
    from llmpress.modules import RUNTIMES
    ap = argparse.ArgumentParser(prog="llmpress", description="Compress Hugging Face causal LMs.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    _add_compress_args(c, planning=False)
    p = sub.add_parser("plan", help="the allocation of a --budget (size, predicted loss), without compressing")
    _add_compress_args(p, planning=True)
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
    _add_device_args(e)

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
    _add_device_args(w)

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


def _number(text: str) -> int | float:
    """An int when the value is whole ("3"), else a float ("2.5")."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _config_from_args(a):
    from llmpress.config import config_from_dict, parse_options
    name, _, spec = a.method.partition(":")        # --method apiq:epochs=2,start=svd
    opts = {"bits": a.bits, "group_size": a.group_size, "sparsity": a.sparsity, "nm": a.nm,
            "param_ratio": a.param_ratio, "damp": a.damp, "alpha": a.alpha, "rank": a.rank, "clip": a.clip,
            "gguf": a.gguf_type, "refine": a.refine, "dim": a.dim, "rows": a.rows, "terms": a.terms}
    kwargs = {**parse_options(spec, a.method), **{k: v for k, v in opts.items() if v is not None}}
    if a.refit is not None:
        if name != "gptq":
            raise LLMPressError("--refit applies to --method gptq")
        kwargs["refit"] = a.refit
    if a.asymmetric:
        kwargs["symmetric"] = False
    if a.act_order:
        kwargs["act_order"] = True
    if a.nm is not None:
        kwargs.setdefault("sparsity", None)
    return config_from_dict({"method": name, **kwargs})


def _write_json(path, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def cmd_compress(a) -> dict:
    from llmpress.export import check_out_dir
    from llmpress.plan import Plan

    if a.command == "plan" and not a.budget:
        raise LLMPressError("plan allocates a --budget (give --budget, or a recipe with one)")
    structural = a.drop_blocks is not None or a.prune_width is not None or a.prune_experts is not None
    given = sum(x is not None for x in (a.method, a.plan, a.budget))
    if a.share_search and a.share_basis is None:
        raise LLMPressError("--share-search needs --share-basis N (the largest group)")
    if a.share_basis is not None and (given or a.online_hadamard or a.recover is not None):
        raise LLMPressError("--share-basis compresses every block linear itself: give it without --method, --plan, "
                            "--budget, --online-hadamard or --recover")
    structural = structural or a.share_basis is not None
    if given > 1 or (given == 0 and not structural):
        raise LLMPressError("give exactly one of --method, --plan or --budget (or none, with --drop-blocks, "
                            "--prune-width, --prune-experts or --share-basis alone)")
    from llmpress.targets import check_extras
    check_extras(a.target, vars(a))
    if a.target == "vllm" and a.budget:
        if a.allocator in ("search", "refine"):
            raise LLMPressError("--target vllm: the layers vLLM fuses share one choice, which the knapsack and "
                                "lagrange allocators support (not search / refine)")
        a.fuse = True
    if a.fuse and (not a.budget or a.allocator in ("search", "refine")):
        raise LLMPressError("--fuse applies to --budget with the knapsack or lagrange allocator")
    budget = None
    if a.budget:
        from llmpress.budget import DEFAULT_MENU, Budget, menu_configs
        budget = Budget.parse(a.budget)
        menu_configs(a.menu or DEFAULT_MENU[budget.metric])       # a bad menu fails before loading
        plan = None
    else:
        plan = (_load_plan(a.plan) if a.plan else Plan.uniform(_config_from_args(a)) if a.method
                else Plan([("*", None)]))       # structural pruning only
    if a.gguf_fallback:
        from llmpress.plan import check_gguf_fallback
        check_gguf_fallback(a.gguf_fallback)
    if getattr(a, "out", None) is not None:
        check_out_dir(a.out, a.overwrite)
    from llmpress.walk import resolve_device, resolve_dtype
    from llmpress.distributed import init_from_env, local_device
    device = resolve_device(a.device)
    if init_from_env(device):                       # under torchrun: data-parallel calibration
        device = local_device(device)
        if a.budget or a.resume:
            raise LLMPressError("under torchrun, compress supports --method / --plan without --resume "
                                "(the sensitivity table and checkpoints are single-process)")
    dtype = resolve_dtype(a.dtype, device)
    from llmpress.models import load_for_compress
    out = Path(a.out) if a.command == "compress" else Path(tempfile.gettempdir()) / "llmpress-plan"
    model, tokenizer, source, scratch = load_for_compress(a.model, dtype, a.offload, out,
                                                          trust_remote_code=a.trust_remote_code)
    return _compress_loaded(a, model, tokenizer, source, plan, budget, device, scratch)


def _load_plan(plan):
    """--plan FILE, or the Plan itself as a recipe records it."""
    from llmpress.plan import Plan
    return Plan.from_dict(plan) if isinstance(plan, dict) else Plan.load(plan)


def _shapes(model, names) -> dict[str, tuple[int, int]]:
    """{fqn: (out_features, in_features)} of the named linears."""
    return {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in names}


def _check_target(a, model, layer_configs) -> None:
    """Refuse, naming the layers, what --target cannot serve (before the layers are compressed)."""
    if a.target == "llmpress":
        return
    from llmpress.targets import refuse_problems, target_problems
    shapes = _shapes(model, layer_configs)
    refuse_problems(a.target, target_problems(a.target, layer_configs, shapes))


def _online_layers(model, spec: str) -> list[str]:
    """'down_proj,self_attn.o_proj' -> the block-local names they end with (each must match one)."""
    from llmpress.arch import adapter_for
    local = [n for g in adapter_for(model).input_groups for n in g]
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        hits = [n for n in local if n == item or n.endswith("." + item)]
        if len(hits) != 1:
            raise LLMPressError(f"--online-hadamard: {item!r} matches {hits or 'no'} block linear(s); choose from {', '.join(local)}")
        out.append(hits[0])
    return out


def _compress_loaded(a, model, tokenizer, source, plan, budget, device, scratch) -> dict:
    from llmpress.arch import adapter_for
    from llmpress.export import save_compressed
    from llmpress.pipeline import compress
    from llmpress.data import calibration_tokens
    from llmpress.eval import model_size

    allocation = tokens = calib = rotation = experts = None
    structure = {}

    def calibration():
        """The calibration windows, read once, on first need."""
        nonlocal tokens
        if tokens is None:
            tokens = calibration_tokens(tokenizer, a.calib, a.num_samples, a.seq_len, a.seed)
        return tokens

    for flag, value in (("--drop-blocks", a.drop_blocks), ("--prune-width", a.prune_width),
                        ("--share-basis", a.share_basis),
                        ("--prune-experts", a.prune_experts), ("--rotate", a.rotate),
                        ("--online-hadamard", a.online_hadamard)):
        if value is not None and value != "" and source is not None:
            raise LLMPressError(f"{flag} needs the whole model in memory (not with --offload)")
    if a.share_basis is not None:
        from llmpress.sharing import check_share
        check_share(model, a.share_basis, a.share_ratio)          # before any other work
    if a.drop_blocks is not None:
        from llmpress.depth import check_drop_count, choose_blocks, drop_blocks
        check_drop_count(model, a.drop_blocks)                    # before reading calibration text
        chosen, why = choose_blocks(model, calibration(), a.drop_blocks, a.block_criterion, device=device)
        structure["depth"] = {"criterion": a.block_criterion, **drop_blocks(model, chosen), **why}
        print(f"blocks: dropped {chosen} ({a.block_criterion}), {structure['depth']['blocks_after']} left",
              file=sys.stderr)
    if a.prune_width is not None:
        from llmpress.width import kept_width, prune_width
        k = kept_width(model, a.prune_width, a.width_multiple)     # checked before reading calibration text
        structure["width"] = {"share": a.prune_width,
                              **prune_width(model, calibration(), k, a.width_criterion, device=device)}
        print(f"MLP width: {structure['width']['intermediate_before']} -> {k} neurons ({a.width_criterion})",
              file=sys.stderr)
    if a.prune_experts is not None:
        from llmpress.experts import choose_experts, expert_scores, experts_to_keep, prune_experts
        keep = experts_to_keep(model, a.prune_experts)            # checked before reading calibration text
        scores = expert_scores(model, calibration(), device=device)
        experts = {"criterion": a.expert_criterion, "share": a.prune_experts,
                   **prune_experts(model, choose_experts(scores, keep, a.expert_criterion))}
        print(f"experts: {experts['experts_before']} -> {experts['experts_after']} per layer "
              f"({a.expert_criterion})", file=sys.stderr)
    if a.rotate:
        from llmpress.rotate import choose_rotation, rotate_model
        seed, searched = a.rotate_seed, None
        if a.rotate_search:
            seed, searched = choose_rotation(model, calibration(), a.rotate,
                                             range(a.rotate_seed, a.rotate_seed + a.rotate_search))
        rotation = rotate_model(model, a.rotate, seed)
        if searched:
            rotation["search"] = {str(k): v for k, v in searched.items()}
    if a.online_hadamard:
        from llmpress.rotate import rotate_online
        rotation = {**(rotation or {}), "online": rotate_online(model, _online_layers(model, a.online_hadamard),
                                                                a.rotate_seed)}
    if a.share_basis is not None:
        from llmpress.sharing import search_partition, share_basis
        partition = search = None
        if a.share_search:
            partition, search = search_partition(model, calibration(), a.share_ratio, a.share_basis, device=device)
        structure["basis_sharing"] = {**share_basis(model, calibration(), a.share_basis, a.share_ratio, partition,
                                                    device=device), "search": search}
        groups = structure["basis_sharing"]["partition"]
        print("basis sharing: " + ", ".join(f"{k.split('.')[-1]} {sum(len(r) > 1 for r in v)} shared groups"
                                            for k, v in groups.items()) + f"; {a.share_ratio:.0%} of the parameters kept",
              file=sys.stderr)
    if budget is not None:
        from llmpress.budget import check_budget, menu_configs, DEFAULT_MENU
        menu = menu_configs(a.menu or DEFAULT_MENU[budget.metric])
        check_budget(model, menu, budget)              # before reading any calibration text
        if a.target != "llmpress":
            from llmpress.targets import check_menu
            linears = adapter_for(model).linear_names(model)
            check_menu(a.target, menu, set(_shapes(model, linears).values()))
        allocated = _allocate(a, model, tokenizer, calibration(), budget, menu, device, source)
        plan, allocation = allocated.plan, allocated.info
    layer_configs = plan.resolve(adapter_for(model).linear_names(model))
    if a.command == "plan":
        return _report_plan(a, model, plan, layer_configs, allocated)
    if a.recover is not None and not any(c.family == "composite" for c in layer_configs.values()):
        raise LLMPressError("--recover fine-tunes low-rank adapters: give a method that has them (apiq, gptq-lr, oats)")
    from llmpress.distributed import world
    if a.recover is not None and (a.recover < 1 or world()[1] > 1 or source is not None):
        raise LLMPressError("--recover takes a positive step count, one process and a model held in memory")
    substituted = {}
    if a.gguf_fallback:
        from llmpress.plan import with_gguf_fallback
        shapes = _shapes(model, layer_configs)
        layer_configs, substituted = with_gguf_fallback(layer_configs, shapes, a.gguf_fallback)
        for pair in sorted({(v["from"], v["to"]) for v in substituted.values()}):
            n = sum((v["from"], v["to"]) == pair for v in substituted.values())
            print(f"{n} layer(s) take {pair[1]} instead of {pair[0]} (rows not whole 256-weight blocks)", file=sys.stderr)
    _check_target(a, model, layer_configs)
    if any(c.stat for c in layer_configs.values()) or tokens is not None:    # calibrated, or pruned on it
        calibration()
        calib = {"source": a.calib, "num_samples": a.num_samples, "seq_len": a.seq_len, "seed": a.seed}
    one_pass = a.one_pass or a.stats_cache is not None
    from llmpress.distributed import world
    rank, n_ranks = world()
    checkpoint = None
    if a.stats_cache is None and n_ranks == 1:
        from llmpress.checkpoint import Checkpoint, run_key
        out = Path(a.out)
        folder = scratch or out.parent / f".{out.name}.partial"      # the offload folder doubles as it
        settings = {"layers": {k: v.to_dict() for k, v in layer_configs.items()}, "calibration": calib,
                    "propagate": not one_pass, "dtype": str(model.dtype), "batch_size": 8,
                    "sequential": a.sequential, "reference": a.reference, "tune": a.tune,
                    "calibrate_all_experts": a.calibrate_all_experts, "min_expert_tokens": a.min_expert_tokens}
        checkpoint = Checkpoint(folder, settings, run_key(model, tokens, source), resume=a.resume)
        if checkpoint.done:
            print(f"resuming from {folder}: {checkpoint.done} blocks already compressed", file=sys.stderr)
    elif a.resume:
        raise LLMPressError("--resume does not apply to a --stats-cache run")
    report = compress(model, layer_configs, tokens, propagate=not one_pass, stats_cache=a.stats_cache,
                      device=device, source=source, checkpoint=checkpoint, progress=rank == 0,
                      sequential=a.sequential, reference=a.reference, tune=a.tune,
                      calibrate_all_experts=a.calibrate_all_experts, min_expert_tokens=a.min_expert_tokens)
    if rank != 0:                                   # rank 0 writes the output
        return {"rank": rank, "compress_seconds": report.seconds, "reduced_bytes": report.reduced_bytes}
    recovery = None
    if a.recover:
        from llmpress.recover import train_adapters
        recovery = train_adapters(model, tokens.to(device), a.recover, lr=a.recover_lr, batch_size=a.recover_batch)
        print(f"recover: held-out calibration loss {recovery['heldout_loss_before']:.4f} -> "
              f"{recovery['heldout_loss_after']:.4f}" + ("" if recovery["kept"] else " (not lower: adapters put back)"),
              file=sys.stderr)
    if calib:
        calib.update(propagate=not one_pass, sequential=a.sequential, reference=a.reference, tune=a.tune)
        if a.calibrate_all_experts:
            calib["calibrate_all_experts"] = True
    routed = {k: v for k, v in report.layers.items() if "tokens" in v and k.endswith("gate_proj")}
    if routed:
        empty = sum(v["tokens"] == 0 for v in routed.values())
        few = sum("expert_fallback" in v for v in routed.values()) - empty
        print(f"{len(routed)} experts: {empty} got no calibration token (data-free solution), {few} fewer than "
              f"{a.min_expert_tokens} (damping raised); tokens per expert in the manifest's report", file=sys.stderr)
    fallbacks = {k: v for k, v in report.layers.items() if "fallback" in v}
    for fqn, info in fallbacks.items():
        print(f"warning: {fqn}: fell back to {info['fallback']} ({info['reason']})", file=sys.stderr)
    size = model_size(model)
    manifest = {"source_model": a.model, "device": str(device), "rotation": rotation,
                "plan": plan.to_dict(), "allocation": allocation,
                "layers": {k: v.to_dict() for k, v in layer_configs.items()},
                "calibration": calib, "seed": a.seed, "report": report.layers, "size": size,
                "gguf_fallbacks": substituted, "expert_pruning": experts, "structural_pruning": structure or None,
                "recovery": recovery, "recipe": getattr(a, "recipe_fields", None)}
    out = save_compressed(model, tokenizer, a.out, manifest, overwrite=a.overwrite)
    exported = None
    if a.target != "llmpress":
        from llmpress.targets import EXPORT
        fmt, name = EXPORT[a.target]
        exported = str(out / name)
        print(f"--target {a.target}: writing {exported} ({fmt})", file=sys.stderr)
        from llmpress.formats import export_folder
        export_folder(out, fmt, out / name)
    if checkpoint is not None:
        checkpoint.remove()                           # saved: the per-block checkpoint is no longer needed
    result = {"out": str(out), "compress_seconds": report.seconds, **size, "calibration": calib, "recovery": recovery,
              "fallbacks": fallbacks, "gguf_fallbacks": substituted, "allocation": allocation, "processes": n_ranks,
              "reduced_bytes": report.reduced_bytes, "target": a.target, "export": exported}
    if allocation is not None:
        from llmpress.report import plot_allocation
        plot_allocation(allocated.table, allocated.choice, out / "allocation.png",
                        f"{allocation['allocator']} allocation at {allocation['budget']}")
    print(f"compressed {len(layer_configs)} layers in {report.seconds:.1f}s: {size['bytes']:,} bytes, "
          f"{size['bits_per_weight']:.3f} bits/weight -> {out}")
    _write_json(a.json, result)
    return result


def _report_plan(a, model, plan, layer_configs, allocated) -> dict:
    """`llmpress plan`: the allocation, its size and predicted loss; the Plan written if asked."""
    _check_target(a, model, layer_configs)
    info = allocated.info
    counts: dict[str, int] = {}
    for c in layer_configs.values():
        key = c.label() if c is not None else "dense"
        counts[key] = counts.get(key, 0) + 1
    print(f"plan for --budget {a.budget} --target {a.target}: {info['bytes']:,} bytes in the block linears, "
          f"{info['bits_per_weight']:.3f} bits/weight, {info['params_kept']:.3f} of their parameters kept, "
          f"predicted loss increase {info['predicted_error']:.4f} nats/token")
    for label, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d} x {label}")
    if a.plan_out:
        Path(a.plan_out).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        print(f"plan -> {a.plan_out} (llmpress compress --plan {a.plan_out} ...)")
    result = {"allocation": info, "layers": {k: v.to_dict() if v else None for k, v in layer_configs.items()},
              "recipe": getattr(a, "recipe_fields", None)}
    _write_json(a.json, result)
    return result


def _allocate(a, model, tokenizer, tokens, budget, menu, device, source):
    """The sensitivity table (cached) and the allocation, through llmpress.budget.plan_for_budget."""
    from llmpress.budget import plan_for_budget
    held_out = None
    if a.allocator in ("search", "refine"):
        from llmpress.data import calibration_tokens
        # the same seeded permutation, 4 windows further: disjoint from the calibration windows
        held_out = calibration_tokens(tokenizer, a.calib, a.num_samples + 4, a.seq_len, a.seed)[-4:]
    result = plan_for_budget(model, tokens, budget, menu, a.allocator, held_out=held_out, fuse=a.fuse,
                             sample_windows=a.sample_windows, table_path=a.sensitivity, search_steps=a.search_steps,
                             refine_rounds=a.refine_rounds, device=device, source=source)
    info = result.info
    print(f"allocation ({a.allocator}) ready in {info['allocate_seconds']:.2f}s: {info['params_kept']:.3f} of params "
          f"kept, {info['bits_per_weight']:.3f} bits/weight, {100 * info['use_of_budget']:.1f}% of the budget, "
          f"methods {info['methods']}")
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
        if a.command in ("compress", "plan"):          # flags -> one resolved recipe (llmpress.recipe)
            from llmpress.recipe import MACHINE, explicit_options, namespace
            machine = {k: v for k, v in vars(a).items() if k in MACHINE}
            a = namespace(a.model, getattr(a, "out", None), a.recipe, a.command, machine,
                          **explicit_options(argv, a.command))
        {"compress": cmd_compress, "plan": cmd_compress, "eval": cmd_eval, "demo": cmd_demo, "sweep": cmd_sweep,
         "report": cmd_report, "verify": cmd_verify, "export": cmd_export}[a.command](a)
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
