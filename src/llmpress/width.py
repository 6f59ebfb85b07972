"""Width pruning of the MLPs: every block keeps the same k of its I intermediate neurons, so the
result is a standard config with `intermediate_size` = k (smaller MLP matmuls) that transformers and
llama.cpp load without custom code (tested).

Neuron j of a block is row j of gate_proj / up_proj and column j of down_proj. With h the
down projection's input on calibration tokens and H = E[h h^T] (I, I) (damped like GPTQ):
- `obs`: structured Optimal Brain Surgeon on down_proj's columns (as in ZipLM, Kurtic et al. 2023,
  "ZipLM: Inference-Aware Structured Pruning of Language Models", arXiv:2302.04089): remove the
  neurons whose loss ||W_:,j||^2 / [H^-1]_jj is least, a few at a time, and update the remaining
  columns by the OBS correction, which leaves them at the least-squares refit for the kept set;
- `wanda`: score_j = ||W_:,j||^2 H_jj (the diagonal, Wanda-style structured score, as in
  Wanda-sp / FLAP's baselines), then the same least-squares refit of down_proj on the kept set:
  W' = W H[:, K] H[K, K]^-1, the minimizer of E||W h - W' h_K||^2.
Blocks are pruned in order, each on the outputs of the blocks pruned before it.
"""
from __future__ import annotations

import torch
from torch import nn

from llmpress.errors import LLMPressError

CRITERIA = ("obs", "wanda")
ROUNDS = 64          # obs removes the neurons in this many rounds (ceil(remove / ROUNDS) per round)


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.double()
    return H + damp * H.diagonal().mean().clamp(min=1e-12) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def refit(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Least-squares down projection on the kept inputs: W (out, I), H (I, I), keep (k,) indices ->
    W H_d[:, K] H_d[K, K]^-1 (out, k), H_d the damped H."""
    Hd = _damped(H, damp)
    A = Hd[keep][:, keep]
    return torch.linalg.solve(A, (W.double() @ Hd[:, keep]).T).T.to(W.dtype)


def obs_columns(W: torch.Tensor, H: torch.Tensor, remove: int, damp: float = 0.01,
                rounds: int = ROUNDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured OBS: drop `remove` of W's (out, I) columns under the input second moment H (I, I).
    Each round removes the set S of the lowest ||W_:,j||^2 / [H^-1]_jj and applies the joint update
    W -= W_:,S [H^-1]_SS^-1 [H^-1]_S,: (and the same Schur step on H^-1). Returns (kept indices
    (k,) ascending, W restricted to them (out, k)), the least-squares refit for that set."""
    n = W.shape[1]
    if not 0 < remove < n:
        raise LLMPressError(f"cannot remove {remove} of {n} neurons")
    W = W.double().clone()
    Hinv = torch.linalg.inv(_damped(H, damp))
    alive = torch.ones(n, dtype=torch.bool, device=W.device)
    per_round = -(-remove // rounds)
    left = remove
    while left:
        loss = W.square().sum(0) / Hinv.diagonal().clamp(min=1e-30)
        loss = torch.where(alive, loss, torch.full_like(loss, float("inf")))
        S = torch.topk(loss, min(per_round, left), largest=False).indices
        inv_SS = torch.linalg.inv(Hinv[S][:, S])
        W -= W[:, S] @ inv_SS @ Hinv[S]
        Hinv -= Hinv[:, S] @ inv_SS @ Hinv[S]
        alive[S] = False
        left -= S.numel()
    keep = alive.nonzero().flatten()
    return keep, W[:, keep]


def choose_neurons(W: torch.Tensor, H: torch.Tensor, k: int, criterion: str = "obs",
                   damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept indices (k,), the refit down projection (out, k)) by `criterion`."""
    if criterion == "obs":
        keep, W_new = obs_columns(W, H, W.shape[1] - k, damp)
        return keep, W_new.to(W.dtype)
    if criterion == "wanda":
        score = W.double().square().sum(0) * H.double().diagonal()
        keep = torch.topk(score, k).indices.sort().values
        return keep, refit(W, H, keep, damp)
    raise LLMPressError(f"unknown width criterion {criterion!r}; use {', '.join(CRITERIA)}")


def kept_width(model: nn.Module, share: float, multiple_of: int = 64) -> int:
    """Intermediate neurons per block after removing a share (0, 1), rounded to a multiple."""
    n = int(model.config.intermediate_size)
    if not 0 < share < 1:
        raise LLMPressError(f"the share of MLP neurons to prune must be in (0, 1), got {share!r}")
    if multiple_of < 1:
        raise LLMPressError(f"multiple_of must be >= 1, got {multiple_of}")
    k = round((1 - share) * n / multiple_of) * multiple_of
    if not 0 < k < n:
        raise LLMPressError(f"pruning {share:.1%} of {n} neurons in multiples of {multiple_of} keeps {k}: "
                            "it must keep some and remove some")
    return k


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=like.weight.device,
                    dtype=like.weight.dtype)
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias)
    out.requires_grad_(False)
    return out


@torch.no_grad()
def shrink_mlp(block: nn.Module, keep: torch.Tensor, down_weight: torch.Tensor,
               inputs=("mlp.gate_proj", "mlp.up_proj"), down: str = "mlp.down_proj") -> None:
    """Keep neurons `keep` of a block's MLP: rows of its input projections, and `down_weight`
    (out, k) as the down projection (its bias unchanged)."""
    for name in inputs:
        lin = block.get_submodule(name)
        parent, attr = name.rsplit(".", 1)
        setattr(block.get_submodule(parent), attr,
                _linear(lin.weight[keep], None if lin.bias is None else lin.bias[keep], lin))
    lin = block.get_submodule(down)
    parent, attr = down.rsplit(".", 1)
    setattr(block.get_submodule(parent), attr, _linear(down_weight, lin.bias, lin))
    mlp = block.get_submodule(parent)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())


@torch.no_grad()
def prune_width(model: nn.Module, tokens: torch.Tensor, k: int, criterion: str = "obs", damp: float = 0.01,
                device="cpu", batch_size: int = 8, progress: bool = True) -> dict:
    """Every block's MLP cut to k neurons, in place, block by block on the pruned model's own
    hidden states; the config's `intermediate_size` becomes k. Returns the manifest entry, with
    each block's relative output error of down_proj E||W h - W' h_K||^2 / E||W h||^2."""
    from llmpress.walk import BlockWalk
    if criterion not in CRITERIA:
        raise LLMPressError(f"unknown width criterion {criterion!r}; use {', '.join(CRITERIA)}")
    walk = BlockWalk(model, device, batch_size, progress)
    adapter = walk.adapter
    if adapter.moe is not None:
        raise LLMPressError("width pruning applies to dense MLPs; prune experts (--prune-experts) in a mixture of experts")
    groups = [g for g in adapter.input_groups if any(n.endswith("gate_proj") for n in g)]
    if len(groups) != 1 or ("mlp.down_proj",) not in adapter.input_groups:
        raise LLMPressError(f"{model.config.model_type}: no gate/up/down MLP to prune")
    if any(type(model.get_submodule(n)) is not nn.Linear for n in adapter.linear_names(model)):
        raise LLMPressError("prune the MLPs' width before compressing the model")
    n = int(model.config.intermediate_size)
    if not 0 < k < n:
        raise LLMPressError(f"cannot keep {k} of {n} MLP neurons")
    hidden = walk.capture(tokens)
    errors = []
    for _, block in walk.steps("width pruning"):
        _, stats = walk.collect(block, hidden, {"mlp.down_proj": True})
        H = stats["mlp.down_proj"].hessian().double()
        W = block.get_submodule("mlp.down_proj").weight.double()
        keep, W_new = choose_neurons(W, H, k, criterion, damp)
        delta = W.clone()
        delta[:, keep] -= W_new.double()
        errors.append(((delta @ H) * delta).sum().item() / max(((W @ H) * W).sum().item(), 1e-30))
        shrink_mlp(block, keep, W_new, groups[0])
        hidden = walk.run(block, hidden)           # the next block sees this block's pruned outputs
    model.config.intermediate_size = k
    return {"intermediate_before": n, "intermediate_after": k, "criterion": criterion,
            "relative_output_error": errors}
