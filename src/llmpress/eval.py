"""Evaluation: perplexity with the papers' protocol, and size as stored."""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.arch import adapter_for
from llmpress.errors import LLMPressError
from llmpress.modules import linear_bytes, linear_params


def check_context(model: nn.Module, seq_len: int) -> None:
    """Refuse windows longer than the model's context before any work."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise LLMPressError(f"seq_len {seq_len} exceeds the model's context of {context} tokens")


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> dict:
    """ids: (n_tokens,) the whole evaluation text tokenized once. Non-overlapping windows of seq_len
    from token 0, the short tail dropped; perplexity = exp(mean of the per-window mean losses)."""
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise LLMPressError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        if max_windows < 1:
            raise LLMPressError(f"max_windows must be at least 1, got {max_windows}")
        n_windows = min(n_windows, max_windows)
    check_context(model, seq_len)
    ids = ids.to(_device(model))
    t0 = time.perf_counter()
    losses = []
    for i in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not progress):
        window = ids[i * seq_len:(i + 1) * seq_len][None]          # (1, T)
        losses.append(model(window, labels=window, use_cache=False).loss.float().item())
    mean = sum(losses) / len(losses)
    return {"perplexity": math.exp(mean), "mean_loss": mean, "seq_len": seq_len, "windows": n_windows,
            "total_windows": ids.numel() // seq_len, "eval_seconds": time.perf_counter() - t0}


def model_size(model: nn.Module) -> dict:
    """Size of the decoder blocks' linear layers (the compressible part) as stored.
    `bits_per_weight` = 8 * bytes / parameters of the dense layers they stand for."""
    adapter = adapter_for(model)
    modules = [model.get_submodule(n) for n in adapter.linear_names(model)]
    nbytes = sum(linear_bytes(m) for m in modules) - _shared_bytes(modules)
    params = sum(linear_params(m) for m in modules)
    return {"params": params, "bytes": nbytes, "bits_per_weight": 8 * nbytes / params,
            "total_params": sum(p.numel() for p in model.parameters())}


def _shared_bytes(modules) -> int:
    """Bytes of the tensors one module holds that an earlier one already does (a basis shared by
    several layers, llmpress.sharing): stored once, so counted once."""
    seen, dup = set(), 0
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if not t.numel():
                continue
            if key in seen:
                dup += t.numel() * t.element_size()
            seen.add(key)
    return dup


@torch.inference_mode()
def kl_to_base(model: nn.Module, base: nn.Module, ids: torch.Tensor, seq_len: int = 2048,
               max_windows: int | None = 4, progress: bool = True) -> dict:
    """KL(base || model) of the next-token distributions, mean per token in nats, and top-1
    agreement, over the same non-overlapping windows as perplexity (held-out text)."""
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise LLMPressError(f"KL text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    n_windows = min(n_windows, max_windows) if max_windows else n_windows
    check_context(model, seq_len)
    ids = ids.to(_device(model))
    kl_sum, agree, count = 0.0, 0, 0
    for i in tqdm(range(n_windows), desc="kl", unit="window", disable=not progress):
        window = ids[i * seq_len:(i + 1) * seq_len][None]
        logp = torch.log_softmax(base(window, use_cache=False).logits[0].float(), -1)     # (T, V)
        logq = torch.log_softmax(model(window, use_cache=False).logits[0].float(), -1)
        kl_sum += (logp.exp() * (logp - logq)).sum().item()
        agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
        count += window.shape[1]
    return {"kl": kl_sum / count, "top1_agreement": agree / count, "kl_tokens": count, "kl_seq_len": seq_len}


@torch.inference_mode()
def speed(model: nn.Module, prompt_len: int = 256, decode_tokens: int = 32, batch_sizes=(1, 8),
          repeats: int = 2) -> dict:
    """Prefill and decode throughput (tokens/s, best of `repeats`) at each batch size, on random
    token ids; the decode loop feeds one token per step through the KV cache, greedy."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    out = {}
    for b in batch_sizes:
        ids = torch.randint(0, vocab, (b, prompt_len), generator=gen).to(_device(model))
        prefill, decode = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            res = model(ids, use_cache=True)
            prefill.append(time.perf_counter() - t)
            cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(decode_tokens):
                res = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            decode.append(time.perf_counter() - t)
        suffix = "" if b == 1 else f"_batch{b}"
        out[f"prefill_tokens_per_s{suffix}"] = b * prompt_len / min(prefill)
        out[f"decode_tokens_per_s{suffix}"] = b * decode_tokens / min(decode)
    out.update({"speed_prompt_len": prompt_len, "speed_decode_tokens": decode_tokens,
                "torch_threads": torch.get_num_threads(), "peak_memory_bytes": peak_memory_bytes()})
    return out


def llamacpp_server(path, n_ctx: int, threads: int, lora=None):
    """A llama.cpp server (the `xllamacpp` CPU wheel) on the GGUF file `path`, with `threads` for
    both prompt and decode, optionally with a LoRA adapter file at scale 1."""
    try:
        import xllamacpp as xlc
    except ImportError as e:
        raise LLMPressError(f"running a GGUF needs llama.cpp's Python wheel: pip install xllamacpp ({e})")
    params = xlc.CommonParams()
    params.model.path = str(path)
    params.n_ctx = n_ctx
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    if lora is not None:
        info = xlc.CommonAdapterLoraInfo()
        info.path, info.scale = str(lora), 1.0
        params.lora_adapters = [info]
    return xlc.Server(params)


def llamacpp_speed(path, prompt_len: int = 256, decode_tokens: int = 32, threads: int | None = None,
                   repeats: int = 2) -> dict:
    """llama.cpp on a GGUF file: prefill and decode tokens/s at batch 1, best of `repeats`, on a
    prompt of random token ids, greedy; the same sizes as `speed`."""
    from pathlib import Path
    if not Path(path).is_file():
        raise LLMPressError(f"{path}: no such GGUF file")
    threads = threads or torch.get_num_threads()
    server = llamacpp_server(path, prompt_len + decode_tokens + 8, threads)
    gen = torch.Generator().manual_seed(0)
    best = {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    try:
        for _ in range(repeats):
            prompt = torch.randint(100, 10000, (prompt_len,), generator=gen).tolist()
            r = server.handle_completions({"prompt": prompt, "max_tokens": decode_tokens, "temperature": 0.0,
                                           "top_k": 1, "seed": 0, "cache_prompt": False, "ignore_eos": True})
            if "timings" not in r:
                raise LLMPressError(f"llama.cpp could not run {path}: {r}")
            best["prefill_tokens_per_s"] = max(best["prefill_tokens_per_s"], r["timings"]["prompt_per_second"])
            best["decode_tokens_per_s"] = max(best["decode_tokens_per_s"], r["timings"]["predicted_per_second"])
    finally:
        del server
    return {**best, "threads": threads, "file_bytes": Path(path).stat().st_size}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (tied tensors once), plus any packed
    form or dense weight its compressed layers' runtime built."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        packed = getattr(m, "_packed", None)
        if packed is not None:
            total += sum(t.numel() * t.element_size() for t in packed)
        kept = getattr(m, "_weight_cache", None)
        if kept is not None:
            total += kept.numel() * kept.element_size()
    return total


def peak_memory_bytes() -> int:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def layer_speed(model: nn.Module, tokens: int = 512, repeats: int = 5) -> dict:
    """Forward time of each kind of compressed layer against the dense nn.Linear it replaces
    (same shapes, same input), summed over the model's layers of that kind."""
    from llmpress.modules import CompressedLinear
    adapter = adapter_for(model)
    totals: dict[str, list[float]] = {}
    for name in adapter.linear_names(model):
        m = model.get_submodule(name)
        if not isinstance(m, CompressedLinear):
            continue
        x = torch.randn(tokens, m.in_features).to(model.dtype)     # the activations the model runs in
        dense = m.dense_weight().to(model.dtype)
        m(x)                                             # build any cached weight first
        t_new = min(_timed(lambda: m(x)) for _ in range(repeats))
        t_dense = min(_timed(lambda: torch.nn.functional.linear(x, dense)) for _ in range(repeats))
        acc = totals.setdefault(type(m).__name__, [0.0, 0.0])
        acc[0] += t_new
        acc[1] += t_dense
    return {kind: {"seconds": a, "dense_seconds": b, "speedup": b / a} for kind, (a, b) in totals.items()}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def disk_bytes(path) -> int | None:
    from pathlib import Path
    p = Path(path)
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else None
