"""Calibration statistics of a linear layer's input, as mergeable accumulators (sum + count), so
batches, shards and devices combine by addition."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llmpress.errors import LLMPressError


GRAM_SPLITS = 4


class InputStats:
    """For inputs X (n, in): gram = X^T X (in, in) [float32] when asked for, the per-channel sums of
    x^2 (the Gram diagonal when there is one, so not stored twice) and |x| [float64], and count = n.

    `hessian()` is the mean Gram matrix (what GPTQ / SparseGPT call H up to a factor 2),
    `col_norms()` the per-input-channel L2 norm ||X_j|| (Wanda), `abs_mean()` the mean |X_j| (AWQ, ASVD).

    With a reference (`add(x, x_ref)`: the same tokens' inputs in the uncompressed model), also
    cross = (X_ref - X)^T X (in, in) [float32]: how far the compressed model's inputs have drifted,
    which asymmetric calibration (llmpress.methods.hessian.toward_reference) corrects for.
    """

    def __init__(self, in_features: int, gram: bool = True, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(in_features, in_features, device=device) if gram else None
        self.cross = None
        self.sq_sum = None if gram else torch.zeros(in_features, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = 0
        # solvers may keep decompositions of (weight, these statistics) here, so that several
        # budgets of one method on one layer (a sensitivity sweep) factorize only once
        self.memo: dict = {}

    def add(self, x: torch.Tensor, x_ref: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()       # (n, in)
        if x_ref is not None:
            if self.cross is None:
                self.cross = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.cross.addmm_((x_ref.detach().reshape(-1, x.shape[1]).float() - x).T, x)
        if self.gram is not None:
            # X^T X is symmetric: accumulate only its lower block triangle (GRAM_SPLITS column
            # panels, about 5/8 of the flops of a full product); gram_matrix() mirrors it
            n = x.shape[1]
            edges = [n * k // GRAM_SPLITS for k in range(GRAM_SPLITS + 1)]
            for lo, hi in zip(edges[:-1], edges[1:]):
                self.gram[lo:, lo:hi].addmm_(x[:, lo:].T, x[:, lo:hi])
        else:
            self.sq_sum += x.square().sum(0)                   # float32 per batch, float64 across
        self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.abs_sum.device

    def to(self, device) -> "InputStats":
        """Moved to `device` in place (members of an input group share one object); returns self."""
        if torch.device(device) != self.device:
            self.gram = None if self.gram is None else self.gram.to(device)
            self.cross = None if self.cross is None else self.cross.to(device)
            self.sq_sum = None if self.sq_sum is None else self.sq_sum.to(device)
            self.abs_sum = self.abs_sum.to(device)
            self.memo = {}
        return self

    def merge(self, other: "InputStats") -> "InputStats":
        if self.gram is not None:
            self.gram += other.gram      # both lower-triangular accumulations
        else:
            self.sq_sum += other.sq_sum
        if (self.cross is None) != (other.cross is None):
            raise LLMPressError("cannot merge statistics with and without a reference")
        if self.cross is not None:
            self.cross += other.cross
        self.abs_sum += other.abs_sum
        self.count += other.count
        return self

    def square_sums(self) -> torch.Tensor:
        return torch.diagonal(self.gram).double() if self.gram is not None else self.sq_sum

    def gram_matrix(self) -> torch.Tensor:
        """The full symmetric X^T X (in, in), float32."""
        if self.gram is None:
            raise LLMPressError("this statistic was collected without the Gram matrix")
        return torch.tril(self.gram) + torch.tril(self.gram, -1).T

    def hessian(self) -> torch.Tensor:
        return self.gram_matrix() / max(self.count, 1)

    def col_norms(self) -> torch.Tensor:
        return self.square_sums().sqrt().float()

    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


def device_of(module: nn.Module) -> torch.device:
    return next(t for t in (*module.parameters(), *module.buffers())).device


STATS_FORMAT = 2


def block_key(block: nn.Module, tokens_digest: str, index: int) -> str:
    """Cache key of a block's input statistics: its dense weights, the calibration tokens, its index."""
    h = hashlib.sha256(f"llmpress-stats-{STATS_FORMAT}:{index}:{tokens_digest}".encode())
    for name, t in sorted(block.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor of any dtype (bfloat16 has no numpy type: viewed as bytes)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def hash_block_weights(h, model: nn.Module, source=None) -> None:
    """Feed `h` the decoder blocks' weights, name by name in sorted order, or an offloaded
    checkpoint's fingerprint (its weights are not read for this). Keys of tables and checkpoints."""
    if source is not None:
        h.update(source.fingerprint().encode())
        return
    from llmpress.arch import adapter_for
    prefix = adapter_for(model).blocks_path + "."
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(prefix):
            h.update(name.encode())
            h.update(tensor_bytes(t))


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class StatsCache:
    """Per-block input statistics on disk (safetensors), one file per block key. The key is stored
    inside the file and checked on load, so a renamed or stale file is never used."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key[:32]}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, stats: dict[str, InputStats]) -> None:
        tensors = {}
        for head, s in stats.items():
            tensors[f"{head}/abs_sum"] = s.abs_sum.cpu()
            if s.sq_sum is not None:
                tensors[f"{head}/sq_sum"] = s.sq_sum.cpu()
            tensors[f"{head}/count"] = torch.tensor([s.count], dtype=torch.int64)
            if s.gram is not None:
                tensors[f"{head}/gram"] = s.gram.cpu()
        tmp = self.path(key).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"key": key})
        tmp.replace(self.path(key))

    def load(self, key: str) -> dict[str, InputStats]:
        path = self.path(key)
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                raise LLMPressError(f"{path}: statistics cache key mismatch; delete the file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        out: dict[str, InputStats] = {}
        for head in {k.rsplit("/", 1)[0] for k in tensors}:
            s = InputStats(tensors[f"{head}/abs_sum"].numel(), gram=False)
            s.gram, s.sq_sum = tensors.get(f"{head}/gram"), tensors.get(f"{head}/sq_sum")
            s.abs_sum = tensors[f"{head}/abs_sum"]
            s.memo = {}
            s.count = int(tensors[f"{head}/count"].item())
            out[head] = s
        return out


def with_prior(stats: InputStats, min_tokens: int) -> tuple[InputStats, dict | None]:
    """Statistics of a layer that saw n < min_tokens inputs (a rarely routed expert) with
    min_tokens - n isotropic pseudo-inputs added, of the same mean square d as the real ones
    (d = 1 when n = 0). Returns (statistics, what was done, for the report) or (stats, None) when
    n >= min_tokens.

    For the Gram matrix that is G + (m - n) d I: a relative damping (m - n) / n on top of the
    method's own, which keeps a few tokens from dictating an (in, in) solve. With no token at all it
    is the identity, under which the second-order methods reduce to their data-free form (GPTQ's
    error feedback vanishes: RTN on the same grid; SparseGPT: magnitude; whitened SVD: plain SVD):
    never a NaN from an empty statistic, never a layer zeroed by a Hessian with no live column."""
    n, m = stats.count, int(min_tokens)
    if n >= m:
        return stats, None
    size = stats.abs_sum.numel()
    d = (stats.square_sums().sum().item() / (n * size)) if n else 1.0
    d = d if d > 0 else 1.0
    extra = m - n
    out = InputStats(size, stats.gram is not None, stats.device)
    if stats.gram is not None:
        out.gram = stats.gram.clone()
        out.gram.diagonal().add_(extra * d)
    else:
        out.sq_sum = stats.sq_sum + extra * d
    out.abs_sum = stats.abs_sum + extra * (2 * d / math.pi) ** 0.5     # E|x| of N(0, d)
    out.cross = None if stats.cross is None else stats.cross.clone()
    out.count = m
    if n == 0:
        return out, {"tokens": 0, "expert_fallback": "no routed token: identity statistics (the data-free solution)"}
    return out, {"tokens": n, "expert_fallback": f"{n} routed tokens < {m}: damping raised by {extra / n:.3g} "
                                          "(isotropic pseudo-tokens)"}
