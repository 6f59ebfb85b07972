"""The one walk over a model's decoder blocks.

capture (run the model up to block 0 on token windows) -> for each block: place it on the compute
device (reading its weights from an offloaded checkpoint first, when there is one), run it on the
hidden states in batches, with statistic hooks when asked -> hand its outputs on -> put it back.
Compression, the sensitivity table, the search allocators and the baselines all walk through here,
so device placement, offloading and progress live in one place.

Where things live: the model's weights stay on the CPU (or on disk, see llmpress.offload) and one
block at a time moves to the compute device. Hidden states (N, T, C) stay on the compute device
when they fit in half of its free memory, and on the CPU otherwise (then each batch moves on use).
Statistics (Gram matrices, norms) accumulate in float32 whatever the model's dtype.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.arch import adapter_for
from llmpress.distributed import all_reduce_stats, world
from llmpress.errors import LLMPressError
from llmpress.stats import InputStats, device_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or 'auto' (a GPU when there is one) -> torch.device, checked."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise LLMPressError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto ({e})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LLMPressError("--device cuda: no CUDA GPU is visible to this process (torch "
                                f"{torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LLMPressError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise LLMPressError(f"device {device} is not supported; use cpu, cuda or auto")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """'auto' / None (the checkpoint's own: returns None) or a name -> torch.dtype, checked against
    what `device` can run."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LLMPressError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    check_dtype_runs(dtype, device)
    return dtype


def check_dtype_runs(dtype: torch.dtype, device: torch.device) -> None:
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise LLMPressError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16; use --dtype float16 or float32")
    try:   # one tiny matmul: catches a dtype this build cannot multiply on this device
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).sum().item()
    except RuntimeError as e:
        raise LLMPressError(f"dtype {str(dtype).removeprefix('torch.')} does not run on {device}: {e}")


def block_hidden(out):
    """A decoder block's output hidden states (some versions return a tuple, some the tensor)."""
    return out[0] if isinstance(out, tuple) else out


class _StopForward(Exception):
    pass


class BlockWalk:
    """Walk `model`'s decoder blocks on `device`. `source`: an llmpress.offload.OffloadedCheckpoint
    whose blocks are read from disk when their turn comes (the model's blocks are then empty
    shells on the meta device until placed)."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = "cpu", batch_size: int = 8,
                 progress: bool = True, source=None):
        if batch_size < 1:
            raise LLMPressError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.adapter = adapter_for(model)
        self.blocks = self.adapter.blocks(model)
        self.prefix = self.adapter.blocks_path
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.progress = progress
        self.source = source
        self.kwargs: dict = {}            # what block 0 was called with besides the hidden states
        self.storage = self.device        # where hidden states are kept between blocks
        self.rank, self.world = world()   # under torch.distributed: this rank's slice of the windows
        self.reduced_bytes = 0            # statistics bytes this rank sent into all-reduces

    def __len__(self) -> int:
        return len(self.blocks)

    def name(self, i: int, local: str) -> str:
        return f"{self.prefix}.{i}.{local}"

    # -- capture -------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the model up to block 0 on `tokens` (N, T) where its embeddings live (the CPU, or
        the device when the model sits there). Returns block 0's inputs (N, T, C) on the storage
        device and keeps the keyword arguments it was called with (position embeddings, masks:
        identical for every batch of the same shape), moved to the compute device."""
        if tokens is None or tokens.ndim != 2 or tokens.numel() == 0:
            raise LLMPressError("calibration tokens must be a non-empty (N, T) tensor")
        if self.world > 1:
            if tokens.shape[0] < self.world:
                raise LLMPressError(f"{tokens.shape[0]} calibration windows cannot be split over {self.world} processes")
            tokens = tokens.tensor_split(self.world)[self.rank]     # this rank's contiguous slice
        captured: list[torch.Tensor] = []
        kwargs_seen: dict = {}

        def hook(module, args, kwargs):
            captured.append(args[0] if args else kwargs.pop("hidden_states"))
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _StopForward

        embed_device = self.model.get_input_embeddings().weight.device
        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for start in range(0, tokens.shape[0], self.batch_size):
                try:
                    self.model(tokens[start:start + self.batch_size].to(embed_device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        kwargs_seen.pop("past_key_values", None)
        kwargs_seen["use_cache"] = False
        self.kwargs = _to(kwargs_seen, self.device)
        hidden = torch.cat(captured)
        self.storage = self._storage_for(hidden)
        return hidden.to(self.storage)

    def resume(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Continue a walk from recorded hidden states (N, T, C) of some block: block 0's keyword
        arguments come from one window of `tokens`; returns `hidden` on the storage device."""
        self.capture(tokens[:self.world])
        self.storage = self._storage_for(hidden)
        return hidden.to(self.storage)

    def _storage_for(self, hidden: torch.Tensor) -> torch.device:
        """Keep activations on the compute device when two copies (inputs and outputs of a block)
        take less than half of its free memory; on the CPU otherwise."""
        if self.device.type != "cuda":
            return self.device
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if 4 * hidden.numel() * hidden.element_size() < free else torch.device("cpu")

    # -- blocks ----------------------------------------------------------------------------------
    @contextmanager
    def placed(self, i: int, keep: bool = True):
        """Block i on the compute device for the duration of the `with`. With an offloaded
        source its weights are read first; on exit, keep=True leaves it (compressed, usually) on
        the CPU, or with an offloaded source writes it to the scratch folder and frees it;
        keep=False frees an offloaded block (a read-only visit)."""
        block = self.blocks[i]
        if self.source is not None:
            self.source.load_block(self.model, i)
        home = next(iter(block.state_dict().values())).device      # where it waits between visits
        block.to(self.device)
        try:
            yield block
        finally:
            block.to(home)
            if self.source is not None:     # written to the scratch folder, or just dropped
                (self.source.finish_block if keep else self.source.release_block)(self.model, i)

    def steps(self, desc: str = "blocks", keep: bool = True, order=None) -> Iterator[tuple[int, nn.Module]]:
        """(i, block placed on the device) for every block in `order` (default: first to last)."""
        order = list(range(len(self.blocks))) if order is None else list(order)
        for i in tqdm(order, desc=desc, unit="block", disable=not self.progress):
            with self.placed(i, keep=keep) as block:
                yield i, block

    # -- running ---------------------------------------------------------------------------------
    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """block(hidden) in batches of `batch_size` windows; (N, T, C) -> (N, T, C) on the storage device."""
        return torch.cat([self._forward(block, hidden[s:s + self.batch_size], stop=False)
                          for s in range(0, hidden.shape[0], self.batch_size)])

    def collect(self, block: nn.Module, hidden: torch.Tensor, heads: dict[str, bool]) -> tuple[torch.Tensor, dict]:
        """One forward of `block` with hooks on the linears named in `heads` (local names; value:
        whether the (in, in) Gram matrix is needed, norms come always). Returns (outputs (N, T, C),
        {member: InputStats}): every member of an input group shares its head's statistic (they
        read the same tensor)."""
        out, stats, _ = self.gather(block, hidden, heads)
        return out, stats

    def gather(self, block: nn.Module, hidden: torch.Tensor, heads: dict[str, bool], reference=None,
               stop: bool = False) -> tuple[torch.Tensor | None, dict, torch.Tensor | None]:
        """`collect` with two options; returns (outputs, statistics, reference outputs).

        reference=(ref_block, ref_hidden): the same block uncompressed and its inputs in the
        uncompressed model; each batch runs through it first and the statistics also get the
        cross term (X_ref - X)^T X (asymmetric calibration); its outputs are the third value.
        stop=True: each forward stops once every head has seen its input (outputs None): the
        statistics of an early group cost only the part of the block in front of it."""
        modules = {h: block.get_submodule(h) for h in heads}
        stats = {h: InputStats(m.in_features, heads[h], device_of(m)) for h, m in modules.items()}
        ref_inputs: dict[str, torch.Tensor] = {}
        seen: set[str] = set()          # heads that have seen the current batch (of the current stream)

        def hook(name, into_ref):
            def f(module, args, out):
                if into_ref:
                    ref_inputs[name] = args[0].detach()
                else:
                    x = args[0]
                    w = getattr(module, "_stat_weight", None)     # router-weighted expert statistics (arch.moe)
                    if w is not None:
                        x = x * w.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
                    stats[name].add(x, ref_inputs.pop(name) if reference is not None else None)
                seen.add(name)
                if stop and len(seen) == len(heads):
                    raise _StopForward
            return f

        handles = [m.register_forward_hook(hook(h, False)) for h, m in modules.items()]
        if reference is not None:
            ref_block, ref_hidden = reference
            handles += [ref_block.get_submodule(h).register_forward_hook(hook(h, True)) for h in heads]
        outs, ref_outs = [], []
        try:
            with torch.no_grad():
                for start in range(0, hidden.shape[0], self.batch_size):
                    if reference is not None:
                        seen.clear()
                        ref_outs.append(self._forward(ref_block, ref_hidden[start:start + self.batch_size], stop))
                    seen.clear()
                    outs.append(self._forward(block, hidden[start:start + self.batch_size], stop))
        finally:
            for h in handles:
                h.remove()
        if self.world > 1:                # every rank saw its slice: sum the statistics
            self.reduced_bytes += all_reduce_stats(stats)
        out = None if stop else torch.cat(outs)
        ref_out = None if stop or reference is None else torch.cat(ref_outs)
        return out, self.share(stats), ref_out

    def _forward(self, block: nn.Module, x: torch.Tensor, stop: bool) -> torch.Tensor | None:
        """block(x) for one batch, on the storage device; None when a hook stopped it (stop=True)."""
        try:
            return block_hidden(block(x.to(self.device), **self.kwargs)).to(self.storage)
        except _StopForward:
            if not stop:
                raise
            return None

    def share(self, by_head: dict[str, InputStats]) -> dict[str, InputStats]:
        """Statistics keyed by each group's first member -> keyed by every member of the group."""
        return {n: by_head[g[0]] for g in self.adapter.input_groups if g[0] in by_head for n in g}

    def all_heads(self) -> dict[str, bool]:
        """Every input group's first member, with its Gram matrix."""
        return {g[0]: True for g in self.adapter.input_groups}

    @torch.no_grad()
    def forward_from(self, hidden: torch.Tensor, start: int = 0, record: list | None = None) -> torch.Tensor:
        """Run blocks start..end on `hidden` (the inputs of block `start`); returns the last block's
        outputs. `record`, a list, gets every block's inputs (on the storage device)."""
        for i, block in self.steps("forward", keep=False, order=range(start, len(self.blocks))):
            if record is not None:
                record.append(hidden)
            hidden = self.run(block, hidden)
        return hidden

    @contextmanager
    def head_placed(self):
        """Within the `with`: the model's final norm and LM head on the compute device, yielded as
        a function hidden (B, T, C) -> logits (B, T, V) (final soft-capping applied, as the model does)."""
        norm = self.model.get_submodule(self.adapter.final_norm_path)
        lm_head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        moved = [m for m in (norm, lm_head) if next(m.parameters()).device != self.device]
        for m in moved:
            m.to(self.device)

        def head(hidden):
            logits = lm_head(norm(hidden))
            return torch.tanh(logits / cap) * cap if cap else logits
        try:
            yield head
        finally:
            for m in moved:
                m.to("cpu")

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the last block's outputs (N, T, C) -> float32 logits (N, T, V)
        on the storage device, window by window."""
        with self.head_placed() as head:
            return torch.cat([head(hidden[k:k + 1].to(self.device)).float().to(self.storage)
                              for k in range(hidden.shape[0])])


@torch.no_grad()
def dense_statistics(model: nn.Module, tokens: torch.Tensor, device="cpu", batch_size: int = 8,
                     progress: bool = False, source=None) -> dict[str, InputStats]:
    """{fqn: InputStats with the Gram matrix} of every compressible linear, measured in one forward
    per block through the unmodified model (no propagation of any compression)."""
    walk = BlockWalk(model, device, batch_size, progress, source)
    hidden = walk.capture(tokens)
    out = {}
    for i, block in walk.steps("statistics", keep=False):
        hidden, stats = walk.collect(block, hidden, walk.all_heads())
        out.update({walk.name(i, k): v.to("cpu") for k, v in stats.items()})
    return out


def _to(obj, device):
    """Tensors inside nested tuples / lists / dicts moved to `device` (other objects as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj
