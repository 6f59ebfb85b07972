"""Save and reload compressed models: safetensors weights + config + tokenizer + manifest.

The manifest (`llmpress.json`) holds the per-layer module specs, the resolved plan, versions, seed
and the SHA-256 of every other file. Loading verifies the hashes, rebuilds the architecture from the
config (no `trust_remote_code`, no pickle), swaps in empty compressed shells and loads the tensors.
A save writes into a temporary folder beside the target and renames it at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmpress.arch import adapter_for
from llmpress.errors import LLMPressError
from llmpress.modules import CompressedLinear, check_runtime, from_spec, module_spec, set_runtime

MANIFEST = "llmpress.json"
# Not `model.safetensors`: plain transformers must fail loudly on a native llmpress folder (it would
# otherwise load the dense architecture with every compressed layer re-initialised at random).
WEIGHTS = "llmpress.safetensors"
FORMAT_VERSION = 3          # 3: a layer may carry an online rotation (its spec says so)
READABLE_VERSIONS = {1: "model.safetensors", 2: WEIGHTS, 3: WEIGHTS}   # format version -> its weights file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import transformers
    import safetensors
    from llmpress import __version__
    return {"llmpress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder (before any heavy work) unless overwrite is set."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LLMPressError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise LLMPressError(f"{out} exists and is not an llmpress output; refusing to replace it")
    return out


def _dedup_state_dict(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied tensors (lm_head = embed_tokens) are stored once; returns (tensors, {dropped: kept})."""
    tensors, seen, tied = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            tied[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.contiguous()
    return tensors, tied


def save_compressed(model, tokenizer, out: str | Path, manifest: dict, overwrite: bool = False) -> Path:
    out = check_out_dir(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        from llmpress.rotate import fold_online
        fold_online(model)         # a layer left dense runs better without its online rotation
        tensors, tied = _dedup_state_dict(model)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):      # the GGUF source's, not ours
            del config.quantization_config
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        modules = {n: module_spec(m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        full = {"format": "llmpress", "format_version": FORMAT_VERSION, **manifest, "modules": modules,
                "tied": tied, "dtype": str(model.dtype).removeprefix("torch."), "versions": versions(),
                "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | Path) -> dict:
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LLMPressError(f"{path}: unreadable {MANIFEST}: {e}")
    if m.get("format") != "llmpress" or m.get("format_version") not in READABLE_VERSIONS:
        raise LLMPressError(f"{path}: not an llmpress folder of format {sorted(READABLE_VERSIONS)}")
    return m


def weights_file(path: str | Path) -> Path:
    """The safetensors file of an llmpress folder (its name depends on the format version)."""
    return Path(path) / READABLE_VERSIONS[read_manifest(path)["format_version"]]


def verify(path: str | Path) -> dict:
    """Check every file's SHA-256 against the manifest; returns the manifest."""
    path = Path(path)
    m = read_manifest(path)
    for name, digest in m["files"].items():
        f = path / name
        if not f.is_file():
            raise LLMPressError(f"{path}: {name} is missing")
        if sha256_file(f) != digest:
            raise LLMPressError(f"{path}: {name} is corrupt (SHA-256 does not match the manifest)")
    return m


def load_compressed(path: str | Path, dtype: torch.dtype | None = None, runtime: str = "fast"):
    """-> (model, tokenizer or None) rebuilt from an llmpress folder. dtype: cast the dense parts
    (embeddings, norms, layers left dense) to it; compressed layers keep their stored form.
    runtime: how the compressed layers run (llmpress.modules.RUNTIMES; "fast" = packed kernels,
    float32 activations cast to bfloat16 inside them, a dense weight kept where no kernel exists;
    "rebuild" or "dense" for the stored weights' exact float32 numerics)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_runtime(runtime)
    path = Path(path)
    m = verify(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, m["dtype"]))
    adapter_for(model)            # a mixture of experts: its experts as the linears the manifest names
    for fqn, spec in m["modules"].items():
        parent, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent), attr, from_spec(spec))
    weights = path / READABLE_VERSIONS[m["format_version"]]
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types on a corrupt header
        raise LLMPressError(f"{weights}: cannot read safetensors ({e})")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in m["tied"]]
    if missing or unexpected:
        raise LLMPressError(f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for dropped, kept in m["tied"].items():
        parent, _, attr = dropped.rpartition(".")
        module = model.get_submodule(parent)
        src_parent, _, src_attr = kept.rpartition(".")
        setattr(module, attr, getattr(model.get_submodule(src_parent), src_attr))
    if dtype is not None and dtype != model.dtype:
        for module in model.modules():
            if not isinstance(module, CompressedLinear):
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(dtype) if p.is_floating_point() else p.data
    set_runtime(model, runtime)
    model.eval()
    has_tokenizer = any(name.startswith("tokenizer") for name in m["files"])
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    return model, tokenizer
