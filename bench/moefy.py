"""A real-weights mixture of experts for the MoE benches (issue 24): no MoE weights ship in any
package, so this builds one from the embedded SmolLM2-135M ("MoEfication", Zhang et al. 2022,
arXiv:2110.01786): every block's MLP (1536 neurons) is split into --experts experts of equal width
by balanced k-means on the neurons' co-activation (|act(gate x) * up x| over calibration tokens),
and a linear router is fitted by least squares to each expert's output norm on those tokens.
Each token runs its --top-k experts. The router's logits are scaled so that Mixtral's softmax
over the top-k gives each chosen expert a weight within ~1% of 1/k, and each expert's down
projection is multiplied by k, so a token's MLP output is (about) the sum of its chosen experts'
neurons: with --top-k equal to --experts the model is the dense one. Written as a standard
Mixtral folder (attention, norms and tied embeddings unchanged) that transformers loads.

Calibration for the split and the router: `wikipedia`, 32 x 512, seed 7 (not the seed-0 windows
the compress benches calibrate on; never the evaluation text). Prints and records the WikiText-2
perplexity (2048 x --windows) of the dense model and of the proxy.

    .venv/bin/python bench/moefy.py [--experts 8] [--top-k 4] [--out bench/.cache/smollm2-moe-8x192-top4]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpress.data import calibration_tokens, eval_tokens  # noqa: E402
from llmpress.eval import perplexity  # noqa: E402
from llmpress.models import load_model  # noqa: E402


def balanced_kmeans(feats: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """feats (n, d), rows L2-normalized -> (n,) cluster of each row, every cluster n / k rows:
    k-means (cosine), then each round's assignment made balanced greedily by similarity."""
    n = feats.shape[0]
    cap = n // k
    g = torch.Generator().manual_seed(seed)
    centers = feats[torch.randperm(n, generator=g)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = feats @ centers.T                                   # (n, k)
        order = sim.flatten().argsort(descending=True)
        assign.fill_(-1)
        count = torch.zeros(k, dtype=torch.long)
        for flat in order.tolist():
            i, c = divmod(flat, k)
            if assign[i] < 0 and count[c] < cap:
                assign[i] = c
                count[c] += 1
        for c in range(k):
            members = feats[assign == c]
            centers[c] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return assign


@torch.no_grad()
def moefy(dense, tokens: torch.Tensor, experts: int, top_k: int, sample: int = 8192):
    import transformers as tf
    cfg = dense.config
    inter = cfg.intermediate_size // experts
    config = tf.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=inter,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=cfg.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, sliding_window=None)
    moe = tf.MixtralForCausalLM(config).eval()
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, a, i=i: inputs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for i, layer in enumerate(dense.model.layers)]
    for s in range(0, tokens.shape[0], 4):
        dense(tokens[s:s + 4])
    for h in hooks:
        h.remove()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    g = torch.Generator().manual_seed(0)
    report = []
    for i, layer in enumerate(dense.model.layers):
        x = torch.cat(inputs.pop(i))
        x = x[torch.randperm(x.shape[0], generator=g)[:sample]]                       # (n, H)
        mlp = layer.mlp
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)                             # (n, I)
        assign = balanced_kmeans(torch.nn.functional.normalize(h.abs().T, dim=1), experts, seed=i)
        groups = [torch.where(assign == e)[0] for e in range(experts)]
        gate_up, down, norms = [], [], []
        for idx in groups:
            gate_up.append(torch.cat([mlp.gate_proj.weight[idx], mlp.up_proj.weight[idx]]))
            down.append(mlp.down_proj.weight[:, idx] * top_k)
            norms.append((h[:, idx] @ mlp.down_proj.weight[:, idx].T).norm(dim=-1))  # (n,)
        target = torch.stack(norms, 1)                                                # (n, E)
        xd = x.double()                                   # Mixtral's router has no bias: none fitted
        w = torch.linalg.solve(xd.T @ xd + 1e-3 * torch.eye(xd.shape[1], dtype=xd.dtype) * xd.shape[0],
                               xd.T @ target.double())                                # (H, E)
        logits = (xd @ w).float()
        chosen = logits.topk(top_k, dim=-1).indices
        best = target.topk(top_k, dim=-1).indices
        overlap = (chosen[:, :, None] == best[:, None, :]).any(-1).float().mean().item()
        covered = target.gather(1, chosen).sum() / target.sum()
        alpha = 0.01 / logits.std().item()                    # softmax over the top-k within ~1% of 1/k
        router = (w.T * alpha).float()                         # (E, H)
        state[f"model.layers.{i}.mlp.gate.weight"] = router
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(down)
        report.append({"router_top_k_overlap": overlap, "norm_covered": covered.item()})
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"state mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    return moe, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--out")
    ap.add_argument("--json", default=str(ROOT / "bench/results/moe_proxy.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(a.out or ROOT / f"bench/.cache/smollm2-moe-{a.experts}x{1536 // a.experts}-top{a.top_k}")
    dense, tok = load_model("smollm2-135m")
    t = time.perf_counter()
    moe, report = moefy(dense, calibration_tokens(tok, "wikipedia", 32, 512, 7), a.experts, a.top_k)
    moe.save_pretrained(out)
    tok.save_pretrained(out)
    ids = eval_tokens(tok, "wikitext2")
    row = {"experts": a.experts, "top_k": a.top_k, "build_seconds": time.perf_counter() - t, "folder": str(out),
           "dense_ppl": perplexity(dense, ids, 2048, a.windows, progress=False)["perplexity"],
           "moe_ppl": perplexity(moe, ids, 2048, a.windows, progress=False)["perplexity"],
           "router_top_k_overlap": sum(r["router_top_k_overlap"] for r in report) / len(report),
           "norm_covered": sum(r["norm_covered"] for r in report) / len(report)}
    print(json.dumps(row, indent=1))
    path = Path(a.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    results[f"proxy-{a.experts}x-top{a.top_k}"] = row
    path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
