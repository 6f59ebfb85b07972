"""Compressed linear layers, stored the way their size is counted.

- QuantLinear: b-bit integers packed densely into bytes (ceil(n*b/8) bytes), fp16 scales per
  (row, group), b-bit packed zero points for asymmetric grids.
- LUTLinear: b-bit packed indices into an fp16 table of 2^b values per row (non-uniform grid).
- GGMLLinear: the bytes of a llama.cpp block type (Q4_1, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), as GGUF holds them.
- VQLinear: packed codes of vectors of `dim` weights into fp16 codebooks shared by blocks of rows,
  an fp16 scale per row.
- SparseLinear: the kept values (fp16) in row-major order plus a 1-bit-per-weight mask.
- LowRankLinear: two factors (fp16) that run as two matmuls, x -> x @ down.T @ up.T.
- QuantLowRankLinear: a QuantLinear plus a LowRank correction of its error (fp16 factors).
- SparseLowRankLinear: a SparseLinear plus a low-rank part (fp16 factors).
- SeriesLinear: a sum of QuantLinear terms, each quantizing the residual of the ones before.
- RoutedLowRankLinear: low-rank factors (fp16) of which each prompt runs the components a linear
  router (fp32) picks (PARSE); llmpress's runtime only.

Every module's `state_dict()` is exactly what is written to disk, and `spec()` + `empty(spec)`
rebuild an empty shell of the right shapes for loading. Float parts are held in their storage
dtype (fp16) and cast at use, so a save -> load round trip gives bit-identical logits.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

STORAGE_DTYPE = torch.float16


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ints < 2**bits (any shape, any device) -> uint8 vector of ceil(numel*bits/8) bytes:
    value k's bit j is bit (k*bits + j) of the stream, bytes filled from their least significant bit."""
    v = q.reshape(-1).to(torch.uint8)
    if bits == 8:
        return v.clone()
    shifts = torch.arange(8, dtype=torch.uint8, device=v.device)
    planes = ((v[:, None] >> shifts[:bits]) & 1).reshape(-1)                 # (numel * bits,) LSB first
    planes = F.pad(planes, (0, -planes.numel() % 8)).view(-1, 8)             # (bytes, 8)
    return (planes << shifts).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 bytes -> uint8 vector of `numel` values (on packed's device)."""
    if bits == 8:
        return packed[:numel].clone()
    if 8 % bits == 0:          # 1, 2, 4 bits: whole values per byte, value j of a byte at bits j*b..
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:numel]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    planes = ((packed[:, None] >> shifts) & 1).reshape(-1)[:numel * bits].view(numel, bits)
    return (planes << shifts[:bits]).sum(1, dtype=torch.int32).to(torch.uint8)


class CompressedLinear(nn.Module):
    """Base: a linear layer whose weight is rebuilt from its stored form at every forward: the
    module holds only what it stores (no dense copy; `with_dense_cache` opts a search's temporary
    working copy into one)."""

    in_features: int
    out_features: int

    runtime = "rebuild"      # how forward runs (see RUNTIMES; set_runtime sets it per module)

    def __init__(self) -> None:
        super().__init__()
        self._weight_cache: torch.Tensor | None = None
        self._packed: tuple | None = None        # a runtime's packed form of the stored weight

    def dense_weight(self) -> torch.Tensor:  # (out, in), float32, on the module's device
        raise NotImplementedError

    def spec(self) -> dict:
        raise NotImplementedError

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight_cache = self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._weight_cache = self._packed = None    # moved or cast: a derived form would be stale
        return super()._apply(fn, *args, **kwargs)

    def weight_for_forward(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight a forward in `dtype` multiplies by: rebuilt from the stored form each
        time under the "rebuild" runtime (unless a search set a working copy), kept once built (in
        `dtype`) under "fast" and "dense"."""
        w = self._weight_cache
        if self.runtime == "rebuild":
            return self.dense_weight() if w is None else w
        if w is None or w.dtype != dtype:
            with torch.no_grad():
                w = self._weight_cache = self.dense_weight().to(dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_for_forward(x.dtype).to(x.dtype), bias)

    def packed_input(self, x: torch.Tensor) -> torch.dtype | None:
        """The activation dtype a packed kernel (torch's CPU int4 / int8 kernels take bfloat16) runs
        this forward in, or None: bfloat16 activations under "rebuild" and "fast", float32
        activations cast to bfloat16 inside the layer under "fast"; never under "dense"."""
        if x.device.type != "cpu" or self.runtime == "dense":
            return None
        if x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and self.runtime == "fast"):
            return torch.bfloat16
        return None

    def _init_bias(self, bias: torch.Tensor | None) -> None:
        self.register_buffer("bias", None if bias is None else bias.detach().to(STORAGE_DTYPE).clone())


class QuantLinear(CompressedLinear):
    """Weight = (q - zero) * scale per (row, group of `group_size` input columns); the last group
    may be shorter when group_size does not divide in_features."""

    def __init__(self, in_features, out_features, bits, group_size, symmetric, qweight, scale, zero=None, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.register_buffer("qweight", qweight)                 # uint8 (ceil(out*in*bits/8),)
        self.register_buffer("scale", scale.to(STORAGE_DTYPE))   # (out, n_groups)
        self.register_buffer("zero", zero)                       # uint8 packed (asym) or None
        self._init_bias(bias)

    @property
    def n_groups(self) -> int:
        return math.ceil(self.in_features / self.group_size)

    def int_weight(self) -> torch.Tensor:  # (out, in) uint8
        return unpack_bits(self.qweight, self.bits, self.out_features * self.in_features).view(
            self.out_features, self.in_features)

    def zeros(self) -> torch.Tensor:  # (out, n_groups) float32
        if self.symmetric:
            return torch.full((self.out_features, self.n_groups), float(2 ** (self.bits - 1)), device=self.scale.device)
        return unpack_bits(self.zero, self.bits, self.out_features * self.n_groups).view(
            self.out_features, self.n_groups).float()

    def dense_weight(self) -> torch.Tensor:
        q, zero, scale = self.int_weight(), self.zeros(), self.scale.float()     # (out, in), (out, G), (out, G)
        if self.in_features % self.group_size == 0:      # whole groups: broadcast instead of gathering
            q = q.view(self.out_features, self.n_groups, self.group_size).float()
            return ((q - zero[:, :, None]) * scale[:, :, None]).view(self.out_features, self.in_features)
        g = torch.arange(self.in_features, device=scale.device) // self.group_size   # column -> group
        return (q.float() - zero[:, g]) * scale[:, g]

    # Packed execution: torch's CPU int4 kernel takes bf16 activations, groups of 32/64/128/256
    # that divide in_features, and computes (q - 8) * scale + offset per (group, row). fp32
    # activations would make it ~25x slower, so it serves bf16 models; everything else rebuilds the
    # dense weight per forward.
    INT4_GROUPS = (32, 64, 128, 256)

    def runs_packed(self, x: torch.Tensor) -> bool:
        if self.packed_input(x) is None:
            return False
        if self.bits == 8:        # torch's int8 kernel: symmetric, one scale per output channel
            return self.symmetric and self.n_groups == 1
        return (self.bits == 4 and self.group_size in self.INT4_GROUPS and self.in_features % self.group_size == 0
                and self.out_features % 16 == 0)          # the kernel's packing needs rows in 16s

    def _int4(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight in the kernel's packed layout (out, in / 2) uint8, scales and offsets
        (groups, out, 2) bf16), built once: half a byte per weight, no dense copy."""
        if self._packed is None:
            q = self.int_weight().to(torch.int32)                              # (out, in) in 0..15
            scale = self.scale.float()                                         # (out, G)
            offset = (8 - self.zeros()) * scale                                # (q - z) s = (q - 8) s + (8 - z) s
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            sz = torch.stack([scale.T, offset.T], -1).to(torch.bfloat16).contiguous()
            self._packed = (packed, sz)
        return self._packed

    def _int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes - 128 as int8 (out, in), per-channel scales (out,) bf16), built once."""
        if self._packed is None:
            q = (self.int_weight().to(torch.int16) - 128).to(torch.int8)
            self._packed = (q, self.scale[:, 0].to(torch.bfloat16))
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_packed(x):
            return super().forward(x)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, *self._int8())
        else:
            packed, sz = self._int4()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def spec(self) -> dict:
        return {"type": "QuantLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "bias": self.bias is not None}

    @classmethod
    def empty(cls, s: dict) -> "QuantLinear":
        n_groups = math.ceil(s["in_features"] / s["group_size"])
        nbytes = math.ceil(s["out_features"] * s["in_features"] * s["bits"] / 8)
        zero = None if s["symmetric"] else torch.zeros(math.ceil(s["out_features"] * n_groups * s["bits"] / 8), dtype=torch.uint8)
        return cls(s["in_features"], s["out_features"], s["bits"], s["group_size"], s["symmetric"],
                   torch.zeros(nbytes, dtype=torch.uint8), torch.zeros(s["out_features"], n_groups),
                   zero, torch.zeros(s["out_features"]) if s["bias"] else None)


class GGMLLinear(CompressedLinear):
    """A layer quantized onto one of llama.cpp's block grids (Q4_1, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS; see
    llmpress.methods.ggml_grid), holding the GGML bytes themselves: what is stored, counted and
    exported to GGUF is one buffer, and the weight is rebuilt exactly as gguf-py dequantizes it.
    4-bit types with 32-weight sub-blocks (Q4_1, Q4_K) run packed on torch's int4 kernel
    (bf16 activations, as QuantLinear)."""

    def __init__(self, in_features, out_features, ggml_type: str, raw: torch.Tensor, bias=None):
        super().__init__()
        from llmpress.methods.ggml_grid import ggml_type as lookup
        self.in_features, self.out_features = in_features, out_features
        self.type = lookup(ggml_type)
        self.register_buffer("raw", raw.to(torch.uint8).reshape(out_features, -1))   # (out, row bytes)
        self._init_bias(bias)

    def dense_weight(self) -> torch.Tensor:
        from llmpress.methods.ggml_grid import decode
        return decode(self.type, self.raw, self.in_features)

    def runs_packed(self, x: torch.Tensor) -> bool:
        return (self.packed_input(x) is not None and self.type.bits == 4
                and self.type.levels is None and self.type.sub in QuantLinear.INT4_GROUPS and self.out_features % 16 == 0)

    def _int4(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._packed is None:
            from llmpress.methods.ggml_grid import decode_parts
            q, scale, offset = decode_parts(self.type, self.raw, self.in_features)   # (out, S, sub), (out, S) x2
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.reshape(self.out_features, -1).to(torch.int32), 2)
            # the kernel computes (q - 8) * scale + zero: zero = offset + 8 scale
            sz = torch.stack([scale.T, (offset + 8 * scale).T], -1).to(torch.bfloat16).contiguous()
            self._packed = (packed, sz)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_packed(x):
            return super().forward(x)
        packed, sz = self._int4()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16), packed,
                                                       self.type.sub, sz)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def spec(self) -> dict:
        return {"type": "GGMLLinear", "in_features": self.in_features, "out_features": self.out_features,
                "ggml_type": self.type.name, "bias": self.bias is not None}

    @classmethod
    def empty(cls, s: dict) -> "GGMLLinear":
        from llmpress.methods.ggml_grid import ggml_type, row_bytes
        nbytes = row_bytes(ggml_type(s["ggml_type"]), s["in_features"])
        return cls(s["in_features"], s["out_features"], s["ggml_type"],
                   torch.zeros(s["out_features"], nbytes, dtype=torch.uint8),
                   torch.zeros(s["out_features"]) if s["bias"] else None)


class LUTLinear(CompressedLinear):
    """Weight[r, j] = table[r, code[r, j]]: b-bit indices packed densely, 2^b fp16 values per row
    (a non-uniform grid, llmpress.methods.lut)."""

    def __init__(self, in_features, out_features, bits, qweight, table, bias=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("qweight", qweight)                          # uint8 (ceil(out*in*bits/8),)
        self.register_buffer("table", table.to(STORAGE_DTYPE).contiguous())   # (out, 2^bits)
        self._init_bias(bias)

    int_weight = QuantLinear.int_weight      # the same packed layout of b-bit codes: (out, in) uint8

    def dense_weight(self) -> torch.Tensor:
        return self.table.float().gather(1, self.int_weight().long())

    def spec(self) -> dict:
        return {"type": "LUTLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "bias": self.bias is not None}

    @classmethod
    def empty(cls, s: dict) -> "LUTLinear":
        nbytes = math.ceil(s["out_features"] * s["in_features"] * s["bits"] / 8)
        return cls(s["in_features"], s["out_features"], s["bits"], torch.zeros(nbytes, dtype=torch.uint8),
                   torch.zeros(s["out_features"], 2 ** s["bits"]), torch.zeros(s["out_features"]) if s["bias"] else None)


class VQLinear(CompressedLinear):
    """Weight[r, dim*v : dim*v + dim] = scale[r] * codebook[r // rows, code[r, v]]: one packed code of
    code_bits = log2(k) bits per vector of `dim` consecutive weights, a codebook of k fp16 vectors per
    block of `rows` rows, an fp16 scale per row (llmpress.methods.vq)."""

    def __init__(self, in_features, out_features, dim, rows, qweight, codebook, scale, bias=None):
        super().__init__()
        self.in_features, self.out_features, self.dim, self.rows = in_features, out_features, dim, rows
        self.code_bits = int(codebook.shape[1]).bit_length() - 1
        self.register_buffer("qweight", qweight)                              # uint8 (ceil(out*in/dim*code_bits/8),)
        self.register_buffer("codebook", codebook.to(STORAGE_DTYPE).contiguous())   # (ceil(out/rows), k, dim)
        self.register_buffer("scale", scale.to(STORAGE_DTYPE))                # (out,)
        self._init_bias(bias)

    def codes(self) -> torch.Tensor:  # (out, in / dim) int64
        n = self.out_features * self.in_features // self.dim
        return unpack_bits(self.qweight, self.code_bits, n).view(self.out_features, -1).long()

    def dense_weight(self) -> torch.Tensor:
        book = (torch.arange(self.out_features, device=self.scale.device) // self.rows)[:, None]
        vectors = self.codebook.float()[book, self.codes()]                   # (out, in / dim, dim)
        return vectors.reshape(self.out_features, self.in_features) * self.scale.float()[:, None]

    def spec(self) -> dict:
        return {"type": "VQLinear", "in_features": self.in_features, "out_features": self.out_features,
                "dim": self.dim, "rows": self.rows, "code_bits": self.code_bits, "bias": self.bias is not None}

    @classmethod
    def empty(cls, s: dict) -> "VQLinear":
        o, i, d = s["out_features"], s["in_features"], s["dim"]
        nbytes = math.ceil(o * i // d * s["code_bits"] / 8)
        return cls(i, o, d, s["rows"], torch.zeros(nbytes, dtype=torch.uint8),
                   torch.zeros(math.ceil(o / s["rows"]), 2 ** s["code_bits"], d), torch.zeros(o),
                   torch.zeros(o) if s["bias"] else None)


class SparseLinear(CompressedLinear):
    """Weight = zeros except at the mask's ones, which take `values` in row-major order."""

    def __init__(self, in_features, out_features, mask_packed, values, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("mask", mask_packed)                   # uint8 (ceil(out*in/8),)
        self.register_buffer("values", values.to(STORAGE_DTYPE))    # (nnz,)
        self._init_bias(bias)

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor, bias=None) -> "SparseLinear":
        """w: (out, in) float; mask: (out, in) bool, True = kept."""
        return cls(w.shape[1], w.shape[0], pack_bits(mask, 1), w[mask], bias)

    def bool_mask(self) -> torch.Tensor:
        return unpack_bits(self.mask, 1, self.out_features * self.in_features).bool().view(
            self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        w = torch.zeros(self.out_features, self.in_features, device=self.values.device)
        w[self.bool_mask()] = self.values.float()
        return w

    def spec(self) -> dict:
        return {"type": "SparseLinear", "in_features": self.in_features, "out_features": self.out_features,
                "nnz": self.values.numel(), "bias": self.bias is not None}

    @classmethod
    def empty(cls, s: dict) -> "SparseLinear":
        n = s["out_features"] * s["in_features"]
        return cls(s["in_features"], s["out_features"], torch.zeros(math.ceil(n / 8), dtype=torch.uint8),
                   torch.zeros(s["nnz"]), torch.zeros(s["out_features"]) if s["bias"] else None)


class LowRankLinear(CompressedLinear):
    """y = up @ (down @ x): two matmuls of cost r*(in+out) instead of in*out per token."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias=None):
        super().__init__()
        self.out_features, self.rank = up.shape
        self.in_features = down.shape[1]
        self.register_buffer("up", up.to(STORAGE_DTYPE).contiguous())      # (out, r)
        self.register_buffer("down", down.to(STORAGE_DTYPE).contiguous())  # (r, in)
        self._init_bias(bias)

    def dense_weight(self) -> torch.Tensor:
        return self.up.float() @ self.down.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime == "dense":                  # the dense export's numerics
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype), bias)

    def spec(self) -> dict:
        return {"type": "LowRankLinear", "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def empty(cls, s: dict) -> "LowRankLinear":
        return cls(torch.zeros(s["out_features"], s["rank"]), torch.zeros(s["rank"], s["in_features"]),
                   torch.zeros(s["out_features"]) if s["bias"] else None)


class RoutedLowRankLinear(CompressedLinear):
    """PARSE (Zhu, Mi, Zhang, Huang 2026, "Different Prompts, Different Ranks: Prompt-aware Dynamic
    Rank Selection for SVD-based LLM Compression", arXiv:2605.08568): low-rank factors whose rank
    components a prompt chooses. Components [0, shared) always run; the next `groups` blocks of
    `group_size` components are the routed "experts", of which each prompt runs `active`: a linear
    router scores the groups from the mean of the prompt's first `route_tokens` inputs.

    Causal by construction: a forward over T > 1 tokens (a prompt, a perplexity window) runs its
    first `route_tokens` tokens on the static pattern (groups 0..active-1: the largest singular
    values, i.e. plain SVD-LLM at rank shared + active * group_size) and the tokens after them on
    the routed one; the pattern is kept for the forwards of single tokens that follow (decoding
    steps), with its gathered factors (PARSE's pattern cache). up (out, R), down (R, in), router
    (groups, in + 1) with R = shared + groups * group_size. `dense_weight()` is the static
    pattern's weight: no export can carry the routing (they refuse these layers)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, router: torch.Tensor, shared: int, groups: int,
                 active: int, route_tokens: int, bias=None):
        super().__init__()
        self.out_features, total = up.shape
        self.in_features = down.shape[1]
        self.shared, self.groups, self.active, self.route_tokens = shared, groups, active, route_tokens
        self.group_size = (total - shared) // groups
        if shared + groups * self.group_size != total or not 0 < active <= groups:
            from llmpress.errors import LLMPressError
            raise LLMPressError(f"RoutedLowRankLinear: {total} components do not split into {shared} shared + "
                                f"{groups} groups (active {active})")
        self.register_buffer("up", up.to(STORAGE_DTYPE).contiguous())          # (out, R)
        self.register_buffer("down", down.to(STORAGE_DTYPE).contiguous())      # (R, in)
        self.register_buffer("router", router.to(torch.float32).contiguous())  # (groups, in + 1)
        self._init_bias(bias)
        self._pattern: torch.Tensor | None = None         # (B, active) groups of the last prompt
        self._gathered: dict = {}                          # pattern -> (down_sel, up_sel), this prompt

    @property
    def rank(self) -> int:
        """Components a token runs: shared + active * group_size."""
        return self.shared + self.active * self.group_size

    def components(self, groups: torch.Tensor) -> torch.Tensor:
        """Indices (rank,) of the components that run for these `active` groups."""
        g = self.group_size
        routed = (self.shared + groups.long()[:, None] * g + torch.arange(g, device=groups.device)).reshape(-1)
        return torch.cat([torch.arange(self.shared, device=groups.device), routed.sort().values])

    def static_groups(self) -> torch.Tensor:
        return torch.arange(self.active, device=self.up.device)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) -> the `active` groups (B, active) each prompt's first route_tokens choose."""
        f = x[:, :self.route_tokens].float().mean(1)                              # (B, in)
        scores = f @ self.router[:, :-1].T + self.router[:, -1]                   # (B, groups)
        return scores.topk(self.active, dim=-1).indices.sort(-1).values

    def dense_weight(self) -> torch.Tensor:
        idx = self.components(self.static_groups())
        return self.up[:, idx].float() @ self.down[idx].float()

    def _factors(self, groups: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(groups.tolist()), dtype)
        if key not in self._gathered:
            idx = self.components(groups)
            self._gathered[key] = (self.down[idx].to(dtype), self.up[:, idx].to(dtype))
        return self._gathered[key]

    def _run(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        down, up = self._factors(groups, x.dtype)
        return F.linear(F.linear(x, down), up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        static = self.static_groups()
        if x.dim() != 3:                                   # not a (batch, tokens, features) stream: static
            y = self._run(x, static)
        elif x.shape[1] > 1:                               # a prompt: route it, keep the pattern for decoding
            self._gathered = {}
            pattern = self.route(x)
            self._pattern = pattern
            p = self.route_tokens
            y = self._run(x, static)                       # first route_tokens tokens: the static pattern
            if x.shape[1] > p:
                y = y.clone()
                for b in range(x.shape[0]):
                    y[b, p:] = self._run(x[b, p:], pattern[b])
        else:                                              # a decoding step: the prompt's pattern, cached
            pattern = self._pattern
            if pattern is None or pattern.shape[0] != x.shape[0]:
                y = self._run(x, static)
            else:
                y = torch.cat([self._run(x[b:b + 1], pattern[b]) for b in range(x.shape[0])])
        return y if bias is None else y + bias

    def spec(self) -> dict:
        return {"type": "RoutedLowRankLinear", "in_features": self.in_features, "out_features": self.out_features,
                "components": self.up.shape[1], "shared": self.shared, "groups": self.groups, "active": self.active,
                "route_tokens": self.route_tokens, "bias": self.bias is not None}

    @classmethod
    def empty(cls, s: dict) -> "RoutedLowRankLinear":
        return cls(torch.zeros(s["out_features"], s["components"]), torch.zeros(s["components"], s["in_features"]),
                   torch.zeros(s["groups"], s["in_features"] + 1), s["shared"], s["groups"], s["active"],
                   s["route_tokens"], torch.zeros(s["out_features"]) if s["bias"] else None)


class _PlusLowRank(CompressedLinear):
    """Base of the composites: y = B x + up @ (down @ x), with B a compressed layer held under the
    attribute named `part` (its tensors saved as `<part>.<name>`) and two fp16 factors."""

    part: str = ""
    part_type: type = CompressedLinear

    def __init__(self, base: CompressedLinear, up: torch.Tensor, down: torch.Tensor, bias=None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = up.shape[1]
        setattr(self, self.part, base)                                      # bias-free
        self.register_buffer("up", up.to(STORAGE_DTYPE).contiguous())      # (out, r)
        self.register_buffer("down", down.to(STORAGE_DTYPE).contiguous())  # (r, in)
        self._init_bias(bias)

    def dense_weight(self) -> torch.Tensor:
        return getattr(self, self.part).dense_weight() + self.up.float() @ self.down.float()

    def spec(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                self.part: getattr(self, self.part).spec(), "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def empty(cls, s: dict):
        return cls(cls.part_type.empty(s[cls.part]), torch.zeros(s["out_features"], s["rank"]),
                   torch.zeros(s["rank"], s["in_features"]), torch.zeros(s["out_features"]) if s["bias"] else None)


class QuantLowRankLinear(_PlusLowRank):
    """y = Q x + up @ (down @ x): a quantized layer plus a low-rank correction of its error, run as
    the quantized matmul (packed where QuantLinear runs packed) plus two thin matmuls."""

    part, part_type = "quant", QuantLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one dense matmul when a weight is kept, or "fast" has no kernel for the quantized part
        if self._weight_cache is not None or self.runtime == "dense" or (
                self.runtime == "fast" and not self.quant.runs_packed(x)):
            return super().forward(x)
        y = self.quant(x) + F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)


class SparseLowRankLinear(_PlusLowRank):
    """y = S x + up @ (down @ x): a sparse layer plus a low-rank part (OATS-style decomposition)."""

    part, part_type = "sparse", SparseLinear


class SeriesLinear(CompressedLinear):
    """y = sum_k Q_k x: a series of low-bit QuantLinear terms (bias-free), each quantizing what the
    terms before it left of the weight (llmpress.methods.series); every term runs as its own
    (packed, where QuantLinear runs packed) matmul."""

    def __init__(self, terms: list[QuantLinear], bias=None):
        super().__init__()
        self.in_features, self.out_features = terms[0].in_features, terms[0].out_features
        self.terms = nn.ModuleList(terms)
        self._init_bias(bias)

    def dense_weight(self) -> torch.Tensor:
        return sum(t.dense_weight() for t in self.terms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_cache is not None or self.runtime == "dense" or (
                self.runtime == "fast" and not all(t.runs_packed(x) for t in self.terms)):
            return super().forward(x)
        y = sum(t(x) for t in self.terms)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def spec(self) -> dict:
        return {"type": "SeriesLinear", "in_features": self.in_features, "out_features": self.out_features,
                "terms": [t.spec() for t in self.terms], "bias": self.bias is not None}

    @classmethod
    def empty(cls, s: dict) -> "SeriesLinear":
        return cls([QuantLinear.empty(t) for t in s["terms"]], torch.zeros(s["out_features"]) if s["bias"] else None)


RUNTIMES = {
    "rebuild": "each forward rebuilds the dense weight from the stored form (no copy kept); torch's "
               "packed int4 / int8 kernels under bfloat16 activations: the least memory (compression's own)",
    "fast": "packed kernels under bfloat16 and float32 activations (float32 cast to bfloat16 inside "
            "the layer); layers without a kernel keep their dense weight once built: never slower than dense",
    "dense": "every compressed layer keeps its dense weight (in the activation dtype): the numerics "
             "of the dense export, the memory of the dense model",
}


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        from llmpress.errors import LLMPressError
        raise LLMPressError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


def set_runtime(model: nn.Module, runtime: str) -> nn.Module:
    """Run every compressed layer of `model` under `runtime` (a key of RUNTIMES); kept weights
    and packed forms of the previous runtime are dropped. Returns the model."""
    check_runtime(runtime)
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            m.runtime = runtime
            m._weight_cache = m._packed = None
    return model


def with_dense_cache(module: nn.Module) -> nn.Module:
    """Make a compressed layer keep its rebuilt dense weight (until moved or reloaded): for the
    temporary working copies of a search that runs the same layers many times, never for a model
    that is handed to the user. Returns the module."""
    if isinstance(module, CompressedLinear) and not isinstance(module, (LowRankLinear, RoutedLowRankLinear)):
        with torch.no_grad():
            module._weight_cache = module.dense_weight()
    return module


@contextmanager
def dense_weights_kept(module: nn.Module, dtype: torch.dtype | None = None):
    """While inside: the compressed layers of `module` that rebuild a dense weight per forward keep
    it (built once, float32), so that running a block over many batches (propagating its outputs)
    does not rebuild every weight per batch; dropped on exit. Composites keep their own form (their
    parts keep weights), so every output is bit for bit what the rebuilding forward gives. dtype:
    the activations' (default: the module's parameters'); layers that run a packed kernel on those
    (4 / 8-bit under bfloat16) never read a dense weight, so none is built for them."""
    if dtype is None:
        dtype = next((p.dtype for p in module.parameters()), torch.float32)

    def packed(m) -> bool:
        return hasattr(m, "runs_packed") and m.runs_packed(
            torch.empty(1, m.in_features, dtype=dtype, device=next(m.buffers()).device))
    kept = [with_dense_cache(m) for m in module.modules()
            if isinstance(m, (QuantLinear, GGMLLinear, LUTLinear, VQLinear, SparseLinear)) and m._weight_cache is None
            and not packed(m)]
    try:
        yield module
    finally:
        for m in kept:
            m._weight_cache = None


MODULE_TYPES = {c.__name__: c for c in (QuantLinear, GGMLLinear, LUTLinear, VQLinear, SparseLinear, LowRankLinear,
                                         QuantLowRankLinear, SparseLowRankLinear, SeriesLinear, RoutedLowRankLinear)}


def module_spec(module: CompressedLinear) -> dict:
    """`module.spec()` plus its online rotation (llmpress.rotate), so that `from_spec` rebuilds both."""
    from llmpress.rotate import online_rotation_of
    r = online_rotation_of(module)
    return module.spec() if r is None else {**module.spec(), "online_rotation": r.spec()}


def from_spec(spec: dict) -> CompressedLinear:
    """An empty shell of the layer `module_spec` described (its online rotation attached)."""
    from llmpress.rotate import OnlineHadamard, attach_online
    module = MODULE_TYPES[spec["type"]].empty(spec)
    if "online_rotation" in spec:
        attach_online(module, OnlineHadamard(**spec["online_rotation"]))
    return module


def linear_bytes(module: nn.Module) -> int:
    """Bytes of a (possibly compressed) linear layer as it is stored."""
    if isinstance(module, CompressedLinear):
        return module.stored_bytes()
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def linear_params(module: nn.Module) -> int:
    """Parameters of the dense layer this module stands for (in * out)."""
    return module.in_features * module.out_features
