"""Orthogonal rotations folded into the weights (incoherence processing), before quantization.

QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs",
arXiv:2404.00456) and SpinQuant (Liu et al. 2024, arXiv:2405.16406): an RMSNorm model computes the
same function when its residual stream is rotated by any orthogonal R1, once every norm's scale is
folded into the linears that read it. Weights then spread their outliers over all channels, which a
uniform grid represents with less error. Per-head rotations R2 between v_proj and o_proj are
likewise free. Everything is folded into the weights (no runtime op), so the result is a plain
model of the same architecture and every export path still holds:

  embeddings E (V, d)        -> E R1
  q/k/v, gate/up W (out, d)  -> W diag(gamma) R1      (gamma: the preceding RMSNorm's scale, then 1)
  o/down W (d, in)           -> R1^T W                 (and their biases b -> R1^T b)
  lm_head W (V, d)           -> W diag(gamma_final) R1 (tied embeddings are untied: E R1 differs)
  v_proj rows of each head   -> R2^T W_v,h,  o_proj columns of each head -> W_o,h R2

QuaRot's online Hadamard before down_proj (R4) cannot be folded (SiLU(gate) * up sits in front):
`rotate_online` adds it as a runtime op (OnlineHadamard, at the end of this file) that the native
format carries and the compressed-tensors / GGUF exports fold back (writing those layers dense).
`kind="hadamard"` is the randomized Hadamard diag(+-1) H / sqrt(n) (Sylvester and Paley
constructions: 576 = 8 x 72 and 1536 = 4 x 384 here, 128 x 12 online); `kind="random"` a
random orthogonal matrix (QR of a Gaussian). `choose_rotation` picks among seeds by measured output error
(HeRo-Q's idea: choose the rotation by the quantization error it leads to, not at random).
"""
from __future__ import annotations

import torch
from torch import nn

from llmpress.arch import adapter_for
from llmpress.errors import LLMPressError

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3")
READS_RESIDUAL = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITES_RESIDUAL = ("self_attn.o_proj", "mlp.down_proj")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = chi(j - i), chi the quadratic character mod the prime q."""
    residues = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0] + [1 if k in residues else -1 for k in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 for a prime q = 3 mod 4 (Paley I)."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Hadamard matrix of order 2 (q + 1) for a prime q = 1 mod 4 (Paley II)."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)                     # symmetric conference matrix
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(n, dtype=torch.float64), zero)


def _base(m: int) -> torch.Tensor | None:
    """A (m, m) +-1 block with B B^T = m I from the constructions here, or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def hadamard_factors(n: int, smallest_base: bool = False) -> tuple[int, torch.Tensor]:
    """(2^k, base): H_n = H_{2^k} (Sylvester, symmetric) kron base, base a (m, m) +-1 Paley block
    (or [1]) with n = 2^k m. By default the first construction found dividing n by 2 (what the
    residual rotations use); smallest_base: the largest 2^k whose m has a construction (fewest
    multiply-adds at run time: 1536 = 128 x 12 rather than 4 x 384)."""
    ks = [k for k in range(n.bit_length()) if n % 2 ** k == 0]
    for k in (reversed(ks) if smallest_base else ks):
        base = _base(n // 2 ** k)
        if base is not None:
            return 2 ** k, base
    raise LLMPressError(f"no Hadamard construction here for size {n}; use kind='random'")


def sylvester(n: int) -> torch.Tensor:
    """(n, n) Sylvester Hadamard matrix, n a power of two (symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def hadamard(n: int) -> torch.Tensor:
    """A (n, n) matrix of +-1 with H H^T = n I: Sylvester 2^k, times a Paley block when n = 2^k m."""
    two_k, base = hadamard_factors(n)
    h = torch.kron(sylvester(two_k), base)
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)):
        raise AssertionError(f"Hadamard construction of size {n} is not orthogonal")
    return h


def rotation_matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    """(n, n) orthogonal float64: 'hadamard' (randomized: diag(+-1) H / sqrt(n)) or 'random'."""
    if kind == "hadamard":
        return _signs(n, seed)[:, None] * hadamard(n) / n ** 0.5       # D H: the signs mix before H does
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    raise LLMPressError(f"unknown rotation {kind!r}; use 'hadamard' or 'random'")


def _signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def check_rotatable(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ROTATABLE:
        raise LLMPressError(f"rotation is built for {', '.join(ROTATABLE)} (pre-norm RMSNorm blocks); "
                            f"got {model_type!r}")
    for fqn, m in model.named_modules():
        if hasattr(m, "dense_weight"):
            raise LLMPressError(f"rotate a dense model: {fqn} is already compressed")


@torch.no_grad()
def rotate_model(model: nn.Module, kind: str = "hadamard", seed: int = 0, heads: bool = True) -> dict:
    """Rotate `model` in place (function unchanged up to float rounding); returns what was done."""
    check_rotatable(model)
    adapter = adapter_for(model)
    config = model.config
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    r1 = rotation_matrix(kind, d, seed)
    r2 = rotation_matrix(kind, head_dim, seed + 1) if heads else None

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    final_norm = model.get_submodule(adapter.final_norm_path)
    head_w = head.weight.double() * final_norm.weight.double()[None, :]
    _set(emb.weight, emb.weight.double() @ r1)
    if tied:                    # the rotated embedding and the rotated head differ: untie
        head.weight = nn.Parameter(torch.empty_like(emb.weight))
        config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None
    _set(head.weight, head_w @ r1)
    final_norm.weight.fill_(1.0)

    for block in adapter.blocks(model):
        for norm_name, readers in READS_RESIDUAL.items():
            norm = block.get_submodule(norm_name)
            for name in readers:
                lin = block.get_submodule(name)
                _set(lin.weight, lin.weight.double() * norm.weight.double()[None, :] @ r1)
            norm.weight.fill_(1.0)
        for name in WRITES_RESIDUAL:
            lin = block.get_submodule(name)
            _set(lin.weight, r1.T @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, r1.T @ lin.bias.double())
        if r2 is not None:
            v, o = block.get_submodule("self_attn.v_proj"), block.get_submodule("self_attn.o_proj")
            wv = v.weight.double().view(-1, head_dim, d)                  # (kv heads, hd, d)
            _set(v.weight, torch.einsum("ij,hjd->hid", r2.T, wv).reshape(-1, d))
            if v.bias is not None:
                _set(v.bias, (v.bias.double().view(-1, head_dim) @ r2).reshape(-1))
            wo = o.weight.double().view(d, -1, head_dim)                  # (d, heads, hd)
            _set(o.weight, (wo @ r2).reshape(d, -1))
    return {"kind": kind, "seed": seed, "hidden": d, "heads": heads, "untied_embeddings": tied,
            "untied_extra_bytes": head.weight.numel() * head.weight.element_size() if tied else 0}


def choose_rotation(model: nn.Module, tokens: torch.Tensor, kind: str = "hadamard", seeds=range(8),
                    config=None, progress: bool = True) -> tuple[int, dict[int, float]]:
    """The seed whose rotation gives the smallest quantization output error (HeRo-Q's idea: pick the
    rotation by the error it causes, measured, instead of taking one at random).

    For each seed: rotate a copy, measure every layer's input Gram matrix on `tokens` (one dense
    forward), quantize every layer with `config` (default RTN 3-bit per channel: data-free, so the
    choice reflects the grid, not a solver) and sum the layers' relative output errors
    ||(W - Q(W)) X||^2 / ||W X||^2. Returns (best seed, {seed: summed error})."""
    import copy

    from tqdm.auto import tqdm

    from llmpress.config import handler_for
    from llmpress.methods.rtn import RTN
    from llmpress.pipeline import relative_output_error
    from llmpress.walk import dense_statistics

    config = config or RTN(bits=3, group_size=0)
    adapter = adapter_for(model)
    errors: dict[int, float] = {}
    for seed in tqdm(list(seeds), desc="rotation search", disable=not progress):
        rotated = copy.deepcopy(model)
        rotate_model(rotated, kind, seed)
        stats = dense_statistics(rotated, tokens)         # keyed by each input group's first member
        total = 0.0
        for i in range(len(adapter.blocks(rotated))):
            prefix = f"{adapter.blocks_path}.{i}."
            for group in adapter.input_groups:
                for name in group:
                    linear = rotated.get_submodule(prefix + name)
                    module, _ = handler_for(config)(linear, config, stats[prefix + group[0]])
                    total += relative_output_error(linear.weight, module.dense_weight(), stats[prefix + group[0]])
        errors[seed] = total
        del rotated, stats
    return min(errors, key=errors.get), errors


# ---------------------------------------------------------------------------------------------
# Online rotations: a Hadamard applied to a linear's input at run time (QuaRot's R4 before
# down_proj; the same across heads before o_proj). Unlike R1 / R2 it cannot be folded into the
# neighbours (SiLU(gate) * up and the attention sit in front), so it is a runtime op: the layer
# stores W R and computes (x R) (W R)^T = x W^T. It costs no storage (the signs come from a seed)
# and about n (2^k + m) multiply-adds per token (n = 2^k m, two small matmuls), against the
# layer's own n * out.

class OnlineHadamard(nn.Module):
    """x (..., n) -> x @ R with R = diag(signs) H / sqrt(n) a randomized Hadamard matrix, computed
    as two small matmuls over its Kronecker factors H = H_{2^k} (x) B (the smallest B here):
    viewing x as (2^k, m), x H = H_{2^k}^T X B."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        two_k, base = hadamard_factors(n, smallest_base=True)
        self.n, self.seed, self.shape = n, seed, (two_k, base.shape[0])
        # derived from (n, seed), not stored: non-persistent buffers stay out of state_dict. All
        # +-1, so exact in any dtype a model is cast to; 1/sqrt(n) is applied in float32.
        self.register_buffer("signs", _signs(n, seed).float(), persistent=False)
        self.register_buffer("left", sylvester(two_k).float(), persistent=False)
        self.register_buffer("right", base.float(), persistent=False)
        self.scale = n ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 whatever x is (1/sqrt(n) has no exact bf16 / fp16 form), then back; each
        # factor as one GEMM over all tokens (not a batch of tiny matmuls)
        signs, left, right = self.signs.float(), self.left.float(), self.right.float()
        y = (x.float() * (signs * self.scale)).reshape(-1, *self.shape) @ right   # (N, 2^k, m): X B
        y = (y.transpose(1, 2) @ left).transpose(1, 2)                          # (X B)^T A, back: A^T X B
        return y.reshape(x.shape).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """R (n, n) float64."""
        h = torch.kron(sylvester(self.shape[0]), _base(self.shape[1]))
        return _signs(self.n, self.seed)[:, None] * h / self.n ** 0.5

    def spec(self) -> dict:
        return {"n": self.n, "seed": self.seed}

    def extra_repr(self) -> str:
        return f"n={self.n}, seed={self.seed}"


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (module.online_rotation(args[0]), *args[1:])


def online_rotation_of(module: nn.Module) -> OnlineHadamard | None:
    r = getattr(module, "online_rotation", None)
    return r if isinstance(r, OnlineHadamard) else None


def attach_online(module: nn.Module, rotation: OnlineHadamard) -> nn.Module:
    """Make `module` rotate its input by `rotation` before its own forward (a forward pre-hook, so
    every forward path of every layer type, and every statistics hook, sees the rotated input)."""
    if online_rotation_of(module) is not None:
        raise LLMPressError("this layer already has an online rotation")
    module.online_rotation = rotation
    module.register_forward_pre_hook(_rotate_input)
    return module


def carry_online(source: nn.Module, module: nn.Module) -> nn.Module:
    """Give a layer built from `source` (a compressed version of it) the source's online rotation."""
    r = online_rotation_of(source)
    if r is not None and online_rotation_of(module) is None:
        attach_online(module, r)
    return module


def detach_online(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _rotate_input:
            del module._forward_pre_hooks[key]
    del module.online_rotation


@torch.no_grad()
def rotate_online(model: nn.Module, layers=("mlp.down_proj",), seed: int = 0) -> dict:
    """Give the linears named `layers` (block-local names) in every block an online Hadamard on
    their input, x -> x R, and its compensation into their weight, W -> W R, so that
    (x R)(W R)^T = x W^T (function unchanged up to float rounding); one R per input size. Compress
    afterwards; layers left dense get their rotation folded back (`fold_online`), since for them it
    is pure cost."""
    adapter = adapter_for(model)
    local_names = [n for g in adapter.input_groups for n in g]
    unknown = [n for n in layers if n not in local_names]
    if unknown or not layers:
        raise LLMPressError(f"online rotation: {unknown or 'no layers'} are not linears of a block; "
                            f"choose from {', '.join(local_names)}")
    rotations: dict[int, tuple[OnlineHadamard, torch.Tensor]] = {}     # in size -> (op, its matrix), once
    for block in adapter.blocks(model):
        for name in layers:
            lin = block.get_submodule(name)
            if hasattr(lin, "dense_weight") or online_rotation_of(lin) is not None:
                raise LLMPressError(f"online rotation: {name} is already compressed or rotated; rotate a dense model")
            n = lin.in_features
            if n not in rotations:
                op = OnlineHadamard(n, seed).to(lin.weight.device)
                rotations[n] = op, op.matrix().to(lin.weight.device)
            op, r = rotations[n]
            _set(lin.weight, lin.weight.double() @ r)
            attach_online(lin, op)
    return {"layers": list(layers), "seed": seed, "kind": "hadamard"}


def folded_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight that computes what `module` does, its online rotation (if
    any) folded back: W' R^T."""
    w = module.dense_weight() if hasattr(module, "dense_weight") else module.weight.float()
    r = online_rotation_of(module)
    return w if r is None else (w.double() @ r.matrix().to(w.device).T).float()


@torch.no_grad()
def fold_online(model: nn.Module) -> list[str]:
    """Fold the online rotation of every dense (uncompressed) linear back into its weight and
    drop it; returns their names."""
    done = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and online_rotation_of(module) is not None:
            _set(module.weight, folded_weight(module))
            detach_online(module)
            done.append(name)
    return done
