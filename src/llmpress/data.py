"""Evaluation and calibration text: named sources, local files, seeded sampling.

Offline first: named sources resolve to files in $LLMPRESS_DATA_DIR, then in `shared/data` beside
the repository; online users fall back to Hugging Face `datasets`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from llmpress.errors import LLMPressError
from llmpress.memory import trim_heap

# name -> path inside the data folder
_FILES = {
    "wikitext2": "wikitext-2-raw/wiki.test.raw",
    "wikipedia": "calibration/wikipedia_en.txt",
}
# name -> (datasets path, config, split, text column), for machines that can reach the Hub
_HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext2-train": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}
EVAL_SOURCES = ("wikitext2",)
CALIB_SOURCES = ("wikipedia", "c4", "wikitext2-train")


def data_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("LLMPRESS_DATA_DIR"):
        dirs.append(Path(os.environ["LLMPRESS_DATA_DIR"]))
    repo_root = Path(__file__).resolve().parents[2]      # src/llmpress/data.py -> repository root
    dirs.append(repo_root.parent / "shared" / "data")
    return [d for d in dirs if d.is_dir()]


def _local_file(name: str) -> Path | None:
    for d in data_dirs():
        if (d / _FILES[name]).is_file():
            return d / _FILES[name]
    return None


def _from_hub(name: str) -> str:
    if name not in _HUB:
        raise LLMPressError(f"{name!r} is a local corpus and was not found in any data folder ({_searched()}); "
                            f"set $LLMPRESS_DATA_DIR to the folder holding {_FILES[name]}")
    path, config, split, column = _HUB[name]
    try:
        import datasets
    except ImportError:
        raise LLMPressError(f"{name!r} is not in any local data folder ({_searched()}) and the "
                            f"`datasets` package is not installed (pip install 'llmpress[online]')")
    try:
        if name == "c4":  # one shard, as the GPTQ / SparseGPT calibration code does
            ds = datasets.load_dataset(path, data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                       split=split)
            return "\n\n".join(ds[column][:3000])
        return "\n\n".join(datasets.load_dataset(path, config, split=split)[column])
    except Exception as e:  # network / hub failures come in many types
        raise LLMPressError(f"could not get {name!r}: not in a local data folder ({_searched()}) and "
                            f"the Hugging Face Hub failed ({type(e).__name__}: {str(e)[:200]})")


def _searched() -> str:
    return "$LLMPRESS_DATA_DIR, ../shared/data beside the repository"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LLMPressError(f"{path} is not UTF-8 text: {e}")


def source_path(source: str) -> Path | None:
    """The local file a source name or path stands for (None when it only exists online)."""
    if source in _FILES:
        return _local_file(source)
    p = Path(source)
    return p if p.is_file() else None


def load_text(source: str) -> str:
    """A named source (`wikitext2`, `wikipedia`, `c4`, `wikitext2-train`) or a local UTF-8 file."""
    path = source_path(source)
    if path is not None:
        return _read_text(path)
    if source in _FILES or source in _HUB:
        return _from_hub(source)
    raise LLMPressError(f"unknown text source {source!r}: not a file, and not one of "
                        f"{sorted(set(_FILES) | set(_HUB))}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def eval_tokens(tokenizer, source: str) -> torch.Tensor:
    """The evaluation stream: the whole text as one string, tokenized once. Returns (n_tokens,)."""
    text = load_text(source)
    if not text.strip():
        raise LLMPressError(f"evaluation text {source!r} is empty")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    trim_heap()
    return ids


def calibration_tokens(tokenizer, source: str, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """(num_samples, seq_len) token windows: the text is tokenized once, cut into non-overlapping
    windows, and `num_samples` of them are drawn without replacement with `seed`."""
    if num_samples < 1 or seq_len < 2:
        raise LLMPressError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples}, {seq_len}")
    if source in EVAL_SOURCES:
        raise LLMPressError(f"{source!r} is evaluation text; calibrate on {', '.join(CALIB_SOURCES)} or a file")
    text = load_text(source)
    for name in EVAL_SOURCES:  # the same content under another path is refused too
        p = _local_file(name)
        if p is not None and p.stat().st_size == len(text.encode("utf-8")) and _digest(_read_text(p)) == _digest(text):
            raise LLMPressError(f"{source} is the {name} evaluation text; never calibrate on it")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    del text
    trim_heap()               # tokenizing a large text leaves hundreds of MB of freed heap behind
    n_windows = ids.numel() // seq_len
    if n_windows < num_samples:
        raise LLMPressError(f"calibration text {source!r} has {ids.numel()} tokens: {n_windows} windows of "
                            f"{seq_len}, fewer than the {num_samples} samples asked for")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(n_windows, generator=gen)[:num_samples]
    return torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in picks.tolist()])
