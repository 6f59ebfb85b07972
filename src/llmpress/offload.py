"""Models larger than memory: a skeleton without weights, each decoder block read from the
checkpoint's safetensors shards when the walk reaches it, and written out (compressed) to a
scratch folder when it is done, so that resident memory stays near

    embeddings + final norm + LM head + one dense block + its calibration activations

during the walk; the compressed blocks are read back only to save the result. Used by
`llmpress compress --offload DIR` (and automatically when the model does not fit in memory).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from llmpress.arch import adapter_for, check_supported
from llmpress.arch.moe import from_hub_names, layout_of
from llmpress.checkpoint import block_metadata, read_block, save_tensors
from llmpress.errors import LLMPressError
from llmpress.memory import trim_heap


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise LLMPressError(f"{index}: unreadable shard index ({e})")
        return [folder / f for f in files]
    return sorted(folder.glob("*.safetensors"))


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of a Hugging Face folder's safetensors weights (their size on disk)."""
    return sum(p.stat().st_size for p in _shards(folder) if p.is_file())


class OffloadedCheckpoint:
    """The tensors of a Hugging Face safetensors checkpoint, read one block at a time into a model
    skeleton whose weights live on the meta device. `scratch` receives each finished block."""

    def __init__(self, folder: str | Path, scratch: str | Path, dtype: torch.dtype):
        self.folder, self.dtype = Path(folder), dtype
        self.where: dict[str, Path] = {}                       # tensor name -> shard
        shards = _shards(self.folder)
        if not shards:
            raise LLMPressError(f"{folder}: no safetensors weights; --offload reads safetensors checkpoints "
                                f"(convert other formats to a Hugging Face folder first)")
        for shard in shards:
            try:
                with safe_open(str(shard), "pt") as f:
                    self.where.update({k: shard for k in f.keys()})
            except Exception as e:     # safetensors raises its own error types on a corrupt header
                raise LLMPressError(f"{shard}: cannot read safetensors ({e})")
        self.scratch = Path(scratch)
        try:
            self.scratch.mkdir(parents=True, exist_ok=True)
            probe = self.scratch / ".llmpress-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise LLMPressError(f"offload folder {scratch} is not writable: {e}")
        self.peak_resident_bytes = 0        # largest weight bytes materialized at once (a probe for tests)

    def fingerprint(self) -> str:
        """Identifies the checkpoint without reading its weights: names, sizes and headers of its shards."""
        h = hashlib.sha256()
        for shard in sorted(set(self.where.values())):
            h.update(shard.name.encode())
            h.update(str(shard.stat().st_size).encode())
            with open(shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 1 << 26)))
        return h.hexdigest()

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise LLMPressError(f"{self.folder}: the checkpoint has no tensors {missing[:3]} that the model needs")
        out: dict[str, torch.Tensor] = {}
        by_shard: dict[Path, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.where[n], []).append(n)
        for shard, keys in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def load_rest(self, model: nn.Module) -> None:
        """Materialize everything outside the decoder blocks (embeddings, final norm, LM head)."""
        prefix = adapter_for(model).blocks_path + "."
        for name, module in model.named_modules():
            if name.startswith(prefix) or name + "." == prefix:
                continue
            own = {k: v for k, v in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
                   if v is not None and v.is_meta}
            if not own:
                continue
            names = [f"{name}.{k}" if name else k for k in own]
            tied = [n for n in names if n not in self.where]
            if tied and getattr(model.config, "tie_word_embeddings", False) and module is model.get_output_embeddings():
                continue                                   # tied to the input embeddings below
            tensors = self._read(names)
            module.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                for k, n in zip(own, names):
                    getattr(module, k).copy_(tensors[n])
        if getattr(model.config, "tie_word_embeddings", False):
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        self._note(model)

    def load_block(self, model: nn.Module, i: int) -> None:
        """Block i from the checkpoint (dense) or, once finished, from the scratch folder."""
        adapter = adapter_for(model)
        block = adapter.blocks(model)[i]
        if not any(t.is_meta for t in (*block.parameters(), *block.buffers())):
            return                                          # already in memory
        done = self.block_file(i)
        if done.is_file():
            read_block(block, done)
            self._note(model)
            return
        prefix = f"{adapter.blocks_path}.{i}."
        layout = layout_of(model.config)
        if layout is not None and layout.hub != "per_expert":     # Hub names differ from the unfused experts'
            tensors = from_hub_names(model.config, self._read([n for n in self.where if n.startswith(prefix)]))
            missing = [prefix + k for k in block.state_dict() if prefix + k not in tensors]
            if missing:
                raise LLMPressError(f"{self.folder}: the checkpoint has no tensors {missing[:3]} that the model needs")
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
        else:
            tensors = {k[len(prefix):]: v for k, v in self._read([prefix + k for k in block.state_dict()]).items()}
        block.to_empty(device="cpu")
        missing, unexpected = block.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise LLMPressError(f"block {i}: checkpoint tensors do not match the model (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
        self._note(model)

    def forget_blocks_from(self, first: int) -> None:
        """Delete finished-block files from block `first` on (a fresh run, or what a resumed run redoes)."""
        for f in self.scratch.glob("block-*.safetensors"):
            if int(f.stem.split("-")[1]) >= first:
                f.unlink()

    def release_block(self, model: nn.Module, i: int) -> None:
        adapter_for(model).blocks(model)[i].to("meta")
        trim_heap()                                    # the freed dense block goes back to the OS

    def block_file(self, i: int) -> Path:
        return self.scratch / f"block-{i:05d}.safetensors"

    def finish_block(self, model: nn.Module, i: int) -> None:
        """Write finished block i (compressed) to the scratch folder (temporary name, then rename)
        and release it from memory."""
        block = adapter_for(model).blocks(model)[i]
        if not self.block_file(i).is_file():           # a checkpoint in this folder may have written it
            save_tensors(block.state_dict(), self.block_file(i), block_metadata(block))
        self.release_block(model, i)

    def load_all(self, model: nn.Module) -> None:
        """Every finished block back in memory (to save the compressed model)."""
        for i in range(len(adapter_for(model).blocks(model))):
            self.load_block(model, i)

    def _note(self, model: nn.Module) -> None:
        seen, total = set(), 0
        for t in (*model.parameters(), *model.buffers()):
            if not t.is_meta and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        self.peak_resident_bytes = max(self.peak_resident_bytes, total)


def load_skeleton(folder: str | Path, scratch: str | Path, dtype: torch.dtype | None = None):
    """-> (model whose decoder blocks are empty meta shells, tokenizer or None, OffloadedCheckpoint).
    dtype None: the checkpoint's own (float32 when the config does not say)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    check_supported(getattr(config, "model_type", None))
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    source = OffloadedCheckpoint(folder, scratch, dtype)
    with init_empty_weights(include_buffers=False):      # parameters on meta; rotary tables computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    source.load_rest(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, source


def save_hf_folder(model: nn.Module, tokenizer, path: str | Path, max_shard_bytes: int = 2 << 30) -> Path:
    """Save a dense model as a plain Hugging Face folder in safetensors shards with an index, e.g. a
    GGUF source dequantized once, so that --offload can read it block by block."""
    from llmpress.formats import write_hf_folder
    return write_hf_folder(model, tokenizer, path, max_shard_bytes=max_shard_bytes)
