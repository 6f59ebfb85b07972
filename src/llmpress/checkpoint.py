"""Resume after a kill: every finished block of a walk is checkpointed into a folder.

Per finished block i the folder gets `block-i.safetensors` (the block's whole state after
compression, with the specs of its compressed layers in the metadata) and `hidden.safetensors`
(what block i+1 reads), then `run.json` records it: the run's settings, a key over the model and the
calibration tokens, the SHA-256 of every recorded file and each block's report entries. Every file
is written under a temporary name, flushed to disk and renamed, and `run.json` last, so a kill or
a power cut at any moment leaves the last recorded state intact; a block file newer than
`run.json` is simply redone, and a recorded file whose hash no longer matches is refused.

The same folder serves the sensitivity table (its per-layer rows per finished block, the dense
outputs that feed the next block, and the loss gradients computed before the walk).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llmpress.errors import LLMPressError
from llmpress.export import sha256_file

RUN = "run.json"
FORMAT = 1
# Test hook: SIGKILL this process right after block K is recorded (deterministic kill point).
KILL_ENV = "LLMPRESS_KILL_AFTER_BLOCK"


def _durable_replace(tmp: Path, path: Path) -> None:
    """fsync the temporary file, rename it over `path`, fsync the folder: survives a power cut."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> str:
    """Write safetensors durably (temporary name, fsync, rename); returns the file's SHA-256."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _durable_replace(tmp, path)
    return sha256_file(path)


class Checkpoint:
    """A walk's progress in `folder`. settings: plain data that must match on resume (the plan,
    calibration settings, propagation...); key: identifies the model weights and calibration
    tokens. resume=False starts a fresh folder (an existing one is replaced)."""

    @classmethod
    def resume_or_start(cls, folder: str | Path, settings: dict, key: str) -> "Checkpoint":
        """Resume when `folder` holds a checkpoint of this very run (same key and settings), start
        afresh otherwise: for caches such as the sensitivity table, whose key says everything."""
        try:
            return cls(folder, settings, key, resume=True)
        except LLMPressError:
            return cls(folder, settings, key, resume=False)

    def __init__(self, folder: str | Path, settings: dict, key: str, resume: bool):
        self.folder = Path(folder)
        self.settings, self.key = json.loads(json.dumps(settings)), key
        self.state = {"format": FORMAT, "settings": self.settings, "key": key, "done": 0, "files": {}, "blocks": {}}
        if resume:
            self._read()
        else:
            self.remove()
            self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def done(self) -> int:
        """Blocks finished and recorded: the walk resumes at this block."""
        return self.state["done"]

    def _read(self) -> None:
        path = self.folder / RUN
        if not path.is_file():
            raise LLMPressError(f"nothing to resume: {self.folder} holds no checkpoint ({RUN} missing)")
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LLMPressError(f"{path}: unreadable checkpoint ({e})")
        if state.get("format") != FORMAT:
            raise LLMPressError(f"{path}: checkpoint format {state.get('format')} is not supported")
        if state["key"] != self.key:
            raise LLMPressError("cannot resume: the model weights or the calibration tokens differ from the "
                                "interrupted run's (start again without --resume)")
        diff = sorted(k for k in set(state["settings"]) | set(self.settings)
                      if state["settings"].get(k) != self.settings.get(k))
        if diff:
            shown = "; ".join(f"{k}: was {state['settings'].get(k)!r}, now {self.settings.get(k)!r}" for k in diff[:4])
            raise LLMPressError(f"cannot resume with different settings ({shown})")
        for name, digest in state["files"].items():
            f = self.folder / name
            if not f.is_file() or sha256_file(f) != digest:
                raise LLMPressError(f"cannot resume: {f} is missing or damaged (SHA-256 differs from {RUN}); "
                                    f"start again without --resume")
        self.state = state

    # -- blocks -------------------------------------------------------------------------------------
    def block_file(self, i: int) -> Path:
        return self.folder / f"block-{i:05d}.safetensors"

    def record(self, i: int, tensors: dict[str, dict[str, torch.Tensor]], entries: dict,
               metadata: dict | None = None) -> None:
        """Block i finished: write its files ({file stem: tensors}) and its entries (report rows,
        table rows: plain data), then record them in run.json."""
        files = dict(self.state["files"])
        for stem, group in tensors.items():
            name = f"{stem}.safetensors"
            files[name] = save_tensors(group, self.folder / name, metadata if stem.startswith("block-") else None)
        self._commit({**self.state, "done": i + 1, "files": files, "blocks": {**self.state["blocks"], str(i): entries}})
        if os.environ.get(KILL_ENV) == str(i):
            os.kill(os.getpid(), signal.SIGKILL)

    def save_extra(self, stem: str, tensors: dict[str, torch.Tensor]) -> None:
        """A file that belongs to the whole run, not to one block (the table's loss gradients)."""
        digest = save_tensors(tensors, self.folder / f"{stem}.safetensors")
        self._commit({**self.state, "files": {**self.state["files"], f"{stem}.safetensors": digest}})

    def _commit(self, state: dict) -> None:
        """Record `state` in run.json durably (written last, after the files it names)."""
        tmp = self.folder / (RUN + ".tmp")
        tmp.write_text(json.dumps(state))
        _durable_replace(tmp, self.folder / RUN)
        self.state = state

    def has(self, stem: str) -> bool:
        return f"{stem}.safetensors" in self.state["files"]

    def entries(self) -> dict[int, dict]:
        return {int(k): v for k, v in self.state["blocks"].items()}

    def tensors(self, stem: str) -> dict[str, torch.Tensor]:
        with safe_open(str(self.folder / f"{stem}.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def save_block(self, block: nn.Module, i: int, hidden: torch.Tensor | None, entries: dict,
                   reference: torch.Tensor | None = None) -> None:
        """Compression: block i's whole state (compressed layers, folded norms) and the inputs of
        block i+1 (and of the uncompressed block i+1: `reference`, with asymmetric calibration)."""
        files = {f"block-{i:05d}": block.state_dict()}
        if hidden is not None:
            files["hidden"] = {"hidden": hidden} if reference is None else {"hidden": hidden, "reference": reference}
        self.record(i, files, entries, block_metadata(block))

    def restore_block(self, block: nn.Module, i: int) -> None:
        """Put finished block i back into the model as it was when recorded."""
        read_block(block, self.block_file(i))

    def remove(self) -> None:
        """Delete this checkpoint's files (only ours: the folder may be a user's offload folder),
        and the folder when nothing else is left in it."""
        if not self.folder.is_dir():
            return
        for pattern in (RUN, RUN + ".tmp", "block-*.safetensors*", "hidden.safetensors*", "grads.safetensors*"):
            for f in self.folder.glob(pattern):
                f.unlink()
        if not any(self.folder.iterdir()):
            self.folder.rmdir()


def block_metadata(block: nn.Module) -> dict:
    """The specs of a block's compressed layers, so that a reader can rebuild their shells."""
    from llmpress.modules import CompressedLinear, module_spec
    return {"specs": json.dumps({n: module_spec(m) for n, m in block.named_modules() if isinstance(m, CompressedLinear)})}


def read_block(block: nn.Module, path: Path) -> None:
    """Load a block file written with block_metadata into `block` (dense or meta shells): its
    compressed layers' shells are rebuilt from the specs first."""
    from llmpress.modules import from_spec
    with safe_open(str(path), "pt") as f:
        specs = json.loads((f.metadata() or {}).get("specs", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for local, spec in specs.items():
        parent, _, attr = local.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, from_spec(spec))
    if any(t.is_meta for t in (*block.parameters(), *block.buffers())):
        block.to_empty(device="cpu")
    missing, unexpected = block.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise LLMPressError(f"{path}: does not match its block (missing {missing[:3]}, unexpected {unexpected[:3]})")


def run_key(model: nn.Module, tokens: torch.Tensor | None, source=None) -> str:
    """SHA-256 over the decoder blocks' weights (or an offloaded checkpoint's fingerprint) and the
    calibration tokens."""
    from llmpress.stats import hash_block_weights, tokens_digest
    h = hashlib.sha256(b"llmpress-run-1")
    h.update((tokens_digest(tokens) if tokens is not None else "no-tokens").encode())
    hash_block_weights(h, model, source)
    return h.hexdigest()
