"""Depth pruning: drop whole decoder blocks. The result is a standard config with fewer layers
(`num_hidden_layers`, `layer_types` cut to match), which transformers and llama.cpp load without
custom code (tested) and which runs fewer blocks per token.

Which blocks, from the hidden states x_l entering block l on calibration tokens (all positions):
- `bi`: ShortGPT's Block Influence BI_l = 1 - mean_t cos(x_l, x_{l+1}); the n blocks of lowest BI
  go (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
  Expect", arXiv:2403.03853);
- `angular`: the contiguous span l..l+n-1 whose input and output are closest in angular distance
  mean_t arccos(cos(x_l, x_{l+n})) / pi (Gromov et al. 2024, "The Unreasonable Ineffectiveness of
  the Deeper Layers", arXiv:2403.17887; the paper reads the last position only, we average all);
- `ppl`: greedy, one block at a time, the block whose removal leaves the lowest perplexity on the
  calibration windows (BlockPruner's search, Zhong et al. 2024, "BlockPruner: Fine-grained Pruning
  for Large Language Models", arXiv:2406.10594, at the granularity of whole blocks: its finer
  attention / MLP units would not give a standard config). It costs about n L^2 / 2 block forwards.
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmpress.errors import LLMPressError

CRITERIA = ("bi", "angular", "ppl")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position cosine (N, T) of two hidden-state tensors (N, T, C), in float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


@torch.no_grad()
def span_distances(model: nn.Module, tokens: torch.Tensor, span: int = 1, device="cpu", batch_size: int = 8,
                   progress: bool = True) -> dict[str, list[float]]:
    """For every start l in 0..L-span, between x_l (the input of block l) and x_{l+span} (the output
    of block l+span-1), averaged over every position of the calibration windows `tokens` (N, T):
    {"cos": mean cosine, "angular": mean arccos(cos)/pi}. Keeps span+1 hidden-state tensors."""
    from llmpress.walk import BlockWalk
    walk = BlockWalk(model, device, batch_size, progress)
    if not 1 <= span < len(walk):
        raise LLMPressError(f"a span of {span} blocks must be at least 1 and leave a block of {len(walk)}")
    states = deque([walk.capture(tokens)], maxlen=span + 1)
    cos, ang = [], []
    for _, block in walk.steps("block distances", keep=False):
        states.append(walk.run(block, states[-1]))
        if len(states) == span + 1:
            c = _cos(states[0], states[-1])
            cos.append(c.mean().item())
            ang.append((torch.arccos(c.clamp(-1, 1)) / torch.pi).mean().item())
    return {"cos": cos, "angular": ang}


@torch.no_grad()
def _nll(walk, head, hidden: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of the last block's outputs (N, T, C), window by window."""
    total = 0.0
    for k in range(hidden.shape[0]):
        logits = head(hidden[k:k + 1].to(walk.device)).float()[0, :-1]
        total += F.cross_entropy(logits, tokens[k, 1:].to(logits.device), reduction="sum").item()
    return total / (hidden.shape[0] * (tokens.shape[1] - 1))


@torch.no_grad()
def greedy_ppl(model: nn.Module, tokens: torch.Tensor, n: int, device="cpu", batch_size: int = 8,
               progress: bool = True) -> tuple[list[int], list[dict]]:
    """BlockPruner's search over whole blocks: n rounds, each dropping the block whose removal
    (with the earlier rounds' removed) gives the lowest calibration perplexity. Returns (dropped
    indices in the order chosen, per round {"dropped", "ppl"})."""
    from llmpress.walk import BlockWalk
    check_drop_count(model, n)
    walk = BlockWalk(model, device, batch_size, progress=False)
    L = len(walk)
    start = walk.capture(tokens)
    dropped: list[int] = []
    rounds = []
    bar = tqdm(total=n, desc="block search", unit="round", disable=not progress)
    with walk.head_placed() as head:
        for _ in range(n):
            alive = [i for i in range(L) if i not in dropped]
            best = None
            prefix = start
            for c in alive:               # prefix = the input of block c with the current drops
                h = prefix
                for j in alive:
                    if j > c:
                        with walk.placed(j, keep=False) as block:
                            h = walk.run(block, h)
                loss = _nll(walk, head, h, tokens)
                if best is None or loss < best[1]:
                    best = (c, loss)
                with walk.placed(c, keep=False) as block:
                    prefix = walk.run(block, prefix)
            dropped.append(best[0])
            rounds.append({"dropped": best[0], "ppl": math.exp(best[1])})
            bar.update()
    bar.close()
    return dropped, rounds


def choose_blocks(model: nn.Module, tokens: torch.Tensor, n: int, criterion: str = "bi", device="cpu",
                  batch_size: int = 8, progress: bool = True) -> tuple[list[int], dict]:
    """The n blocks to drop by `criterion` (sorted), and what the choice was made from."""
    if criterion not in CRITERIA:
        raise LLMPressError(f"unknown block criterion {criterion!r}; use {', '.join(CRITERIA)}")
    if criterion == "ppl":
        order, rounds = greedy_ppl(model, tokens, n, device, batch_size, progress)
        return sorted(order), {"order": order, "rounds": rounds}
    d = span_distances(model, tokens, 1 if criterion == "bi" else n, device, batch_size, progress)
    if criterion == "bi":
        influence = [1 - c for c in d["cos"]]
        order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
        return sorted(order[:n]), {"block_influence": influence}
    start = min(range(len(d["angular"])), key=lambda i: (d["angular"][i], i))
    return list(range(start, start + n)), {"angular_distance": d["angular"]}


def check_drop_count(model: nn.Module, n: int) -> None:
    """Refuse dropping n blocks unless at least one goes and one stays."""
    from llmpress.arch import adapter_for
    L = len(adapter_for(model).blocks(model))
    if not 1 <= n < L:
        raise LLMPressError(f"dropping {n} of {L} blocks: drop at least one and keep one")


def blocks_to_drop(model: nn.Module, share: float) -> int:
    """How many blocks a share (0, 1) of them is, rounded; at least one goes and one stays."""
    from llmpress.arch import adapter_for
    if not 0 < share < 1:
        raise LLMPressError(f"the share of blocks to drop must be in (0, 1), got {share!r}")
    n = round(share * len(adapter_for(model).blocks(model)))
    check_drop_count(model, n)
    return n


@torch.no_grad()
def drop_blocks(model: nn.Module, drop: list[int]) -> dict:
    """Remove decoder blocks `drop` in place: the block list, the attention layers' cache indices
    and the config (`num_hidden_layers`, `layer_types`) now describe the shorter model. Refused
    once a block holds compressed layers (drop first, compress after). Returns the manifest entry."""
    from llmpress.arch import adapter_for
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    L = len(blocks)
    drop = sorted(set(int(i) for i in drop))
    if not drop or len(drop) >= L or drop[0] < 0 or drop[-1] >= L:
        raise LLMPressError(f"blocks to drop {drop} must be distinct indices below {L}, leaving at least one")
    if any(type(model.get_submodule(n)) is not nn.Linear for n in adapter.linear_names(model)):
        raise LLMPressError("drop blocks before compressing the model")
    kept = [b for i, b in enumerate(blocks) if i not in drop]
    parent, attr = adapter.blocks_path.rsplit(".", 1)
    setattr(model.get_submodule(parent), attr, nn.ModuleList(kept))
    for new, block in enumerate(kept):        # the KV cache is indexed by these
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in drop]
    config.num_hidden_layers = len(kept)
    return {"blocks_before": L, "blocks_after": len(kept), "dropped": drop}
