"""PARSE: prompt-aware rank selection for SVD-compressed layers.

Zhu, Mi, Zhang, Huang 2026, "Different Prompts, Different Ranks: Prompt-aware Dynamic Rank
Selection for SVD-based LLM Compression" (arXiv:2605.08568). Static SVD compression runs the same
prefix of singular components for every input; PARSE stores more components than a token runs,
groups them as "experts" and lets a linear router, trained offline against the dense layer's
outputs, pick per prompt which groups run; the pattern is cached across decoding steps.

Here (llmpress.modules.RoutedLowRankLinear): SVD-LLM's whitened factors (the truncation error is
the sum of the discarded s_i^2) keep R = shared + groups * group_size components; the first
`shared` always run, `active` of the `groups` routed groups run per prompt, so a token runs the
rank of `param_ratio` (what SVD-LLM at that ratio runs) and the layer stores about
(shared + groups * group_size) / rank times its factors. The router starts at the static choice
(the largest singular values: exactly SVD-LLM) and `fit_routers` trains it after compression:
per calibration window, the feature is the mean of the layer's first `route_tokens` inputs and the
target is each group's share of the output energy ||U_g V_g x||^2 over the later tokens (what
running that group adds to the output, the groups being orthogonal in the whitened metric); a
ridge regression per layer, its strength chosen on held-out windows, kept only where it captures
more energy than the static choice there. Not on the allocator's menu (its rows would measure the
untrained static router). Runs in llmpress's runtime only: GGUF / compressed-tensors / dense
exports cannot carry a per-prompt choice and refuse these layers.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from llmpress.config import MethodConfig, register
from llmpress.errors import LLMPressError
from llmpress.methods.lowrank import check_ratio, rank_for_ratio, whitened_factors, whitened_svd
from llmpress.modules import RoutedLowRankLinear


@dataclass(frozen=True)
class PARSE(MethodConfig):
    method = "parse"
    family = "low-rank"
    stat = "hessian"
    param_ratio: float = 0.6      # the rank a token runs, as SVD-LLM's param_ratio
    groups: int = 8               # routed groups stored
    active: int = 4               # routed groups a prompt runs
    shared: float = 0.5           # share of the running rank that every prompt runs
    route_tokens: int = 32        # a prompt's first tokens choose its groups (and run the static ones)

    def validate(self) -> None:
        check_ratio(self.param_ratio)
        if not (isinstance(self.groups, int) and isinstance(self.active, int) and 0 < self.active < self.groups):
            raise LLMPressError(f"parse: need integers 0 < active < groups, got active={self.active!r}, "
                                f"groups={self.groups!r}")
        if not 0 <= self.shared < 1:
            raise LLMPressError(f"parse: shared must be in [0, 1), got {self.shared!r}")
        if not isinstance(self.route_tokens, int) or self.route_tokens < 1:
            raise LLMPressError(f"parse: route_tokens must be a positive integer, got {self.route_tokens!r}")

    def layout(self, out_features: int, in_features: int) -> tuple[int, int]:
        """(shared components, components per group) of an (out, in) layer."""
        r = rank_for_ratio(out_features, in_features, self.param_ratio)
        g = max(1, (r - round(self.shared * r)) // self.active)
        return max(0, r - self.active * g), g

    def shape_problem(self, out_features, in_features):
        shared, g = self.layout(out_features, in_features)
        total = shared + self.groups * g
        if total > min(out_features, in_features):
            return (f"parse stores {total} components, more than the layer's rank {min(out_features, in_features)} "
                    f"(lower param_ratio or groups)")
        return None

    def storage(self, out_features, in_features):
        shared, g = self.layout(out_features, in_features)
        total = shared + self.groups * g
        return 2 * total * (out_features + in_features) + 4 * self.groups * (in_features + 1), \
            total * (out_features + in_features)


@register(PARSE)
def apply_parse(linear, config: PARSE, stats):
    w = linear.weight.detach().float()
    problem = config.shape_problem(*w.shape)
    if problem:
        raise LLMPressError(problem)
    shared, g = config.layout(*w.shape)
    total = shared + config.groups * g
    u, s, vh, lower, damp = whitened_svd(w, stats.hessian())
    up, down = whitened_factors(u, s, vh, lower, total)             # (out, R), (R, in): singular-value order
    router = torch.zeros(config.groups, w.shape[1] + 1)
    router[:, -1] = -torch.arange(config.groups, dtype=torch.float32)   # static: groups 0..active-1
    module = RoutedLowRankLinear(up, down, router, shared, config.groups, config.active, config.route_tokens,
                                 linear.bias)
    return module, {"rank": module.rank, "components": total, "damp": damp}


def _group_energies(m: RoutedLowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """x (B, T, in) -> (B, groups): ||U_g V_g x_t||^2 summed over the tokens after route_tokens."""
    z = x[:, m.route_tokens:].float() @ m.down.float().T                     # (B, T', R)
    out = []
    for k in range(m.groups):
        sl = slice(m.shared + k * m.group_size, m.shared + (k + 1) * m.group_size)
        out.append((z[..., sl] @ m.up[:, sl].float().T).square().sum((1, 2)))
    return torch.stack(out, -1)


def _captured(scores: torch.Tensor, shares: torch.Tensor, active: int) -> float:
    """Energy share the top-`active` groups by `scores` (n, G) capture of `shares` (n, G), summed."""
    return shares.gather(1, scores.topk(active, dim=-1).indices).sum().item()


@torch.no_grad()
def fit_routers(model, tokens: torch.Tensor, device="cpu", batch_size: int = 4, progress: bool = True) -> dict:
    """Train every RoutedLowRankLinear's router of `model` on calibration windows `tokens` (N, T)
    (see the module docstring); a quarter of the windows (at least one) is held out to choose the
    ridge strength and to check the router beats the static choice. Returns a per-layer report."""
    from tqdm.auto import tqdm
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RoutedLowRankLinear)}
    if not layers:
        return {}
    if tokens.shape[0] < 2 or tokens.shape[1] <= max(m.route_tokens for m in layers.values()):
        raise LLMPressError("parse: fitting routers needs at least 2 calibration windows longer than route_tokens")
    feats = {n: [] for n in layers}
    energy = {n: [] for n in layers}

    def hook(name):
        def f(module, args, out):
            x = args[0]
            feats[name].append(x[:, :module.route_tokens].float().mean(1).cpu())
            energy[name].append(_group_energies(module, x).cpu())
        return f
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for s in tqdm(range(0, tokens.shape[0], batch_size), desc="parse routers", disable=not progress):
            model(tokens[s:s + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    n_held = max(1, tokens.shape[0] // 4)
    report = {}
    for name, m in layers.items():
        f = torch.cat(feats[name]).double()                                   # (N, in)
        e = torch.cat(energy[name]).double()
        shares = e / e.sum(1, keepdim=True).clamp(min=1e-30)                  # (N, G)
        ftr, fho, str_, sho = f[:-n_held], f[-n_held:], shares[:-n_held], shares[-n_held:]
        mu, sd = ftr.mean(0), ftr.std(0).clamp(min=1e-8)
        x = (ftr - mu) / sd
        ybar = str_.mean(0)
        static_scores = -torch.arange(m.groups, dtype=torch.float64).expand(sho.shape[0], -1)
        best = (_captured(static_scores, sho, m.active), None, None)
        gram = x.T @ x
        for lam in (0.1, 1.0, 10.0, 100.0, 1000.0):
            wr = torch.linalg.solve(gram + lam * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype), x.T @ (str_ - ybar))
            got = _captured(((fho - mu) / sd) @ wr + ybar, sho, m.active)
            if got > best[0] + 1e-12:
                best = (got, lam, wr)
        held_static = _captured(static_scores, sho, m.active)
        if best[1] is not None:
            wr = best[2] / sd[:, None]                                         # (in, G) on raw features
            m.router[:, :-1] = wr.T.float()
            m.router[:, -1] = (ybar - mu @ wr).float()
        report[name] = {"ridge": best[1], "kept": best[1] is not None,
                        "heldout_share_static": held_static / n_held, "heldout_share_routed": best[0] / n_held}
    kept = sum(r["kept"] for r in report.values())
    if progress:
        print(f"parse: {kept} of {len(report)} routers beat the static choice on held-out windows "
              f"({n_held} of {tokens.shape[0]}); the rest stay static", file=sys.stderr)
    return report
