"""Depth pruning (whole blocks) and width pruning (MLP neurons): standard configs that plain
transformers reloads with the same logits, and the properties of the choices and refits."""
import copy
import json

import pytest
import torch

from conftest import compress_cli, tiny_llama
from llmpress.depth import blocks_to_drop, choose_blocks, drop_blocks, greedy_ppl, span_distances
from llmpress.errors import LLMPressError
from llmpress.width import choose_neurons, kept_width, obs_columns, prune_width, refit


def _tokens(n=4, t=32, vocab=256, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _skip_forward(model, ids, skip):
    """Logits of `model` run with the blocks in `skip` left out (the reference for drop_blocks)."""
    m = model.model
    h = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    pe = m.rotary_emb(h, pos)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for i, block in enumerate(m.layers):
        if i not in skip:
            out = block(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(m.norm(h))


@torch.no_grad()
def test_dropped_blocks_equal_skipping_them_and_reload_in_transformers(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM
    from llmpress.formats import export_dense
    model = tiny_llama(layers=5)
    ids = _tokens(2, 16)
    want = _skip_forward(model, ids, {1, 3})
    info = drop_blocks(model, [3, 1])
    assert info == {"blocks_before": 5, "blocks_after": 3, "dropped": [1, 3]}
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    # the KV cache follows the new indices: cached greedy decoding equals recomputing
    a = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
    b = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    out = export_dense(model, tiny_tokenizer, tmp_path / "dense")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.num_hidden_layers == 3
    assert torch.allclose(back(ids).logits, got, atol=1e-5)


def test_layer_types_follow_the_dropped_blocks():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         max_window_layers=2, layer_types=["full_attention", "full_attention",
                                                           "sliding_attention", "sliding_attention"])
    model = Qwen2ForCausalLM(config).eval()
    drop_blocks(model, [1])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    with torch.no_grad():
        model(_tokens(1, 12))


def _identity_block(model, i):
    """Block i adds nothing to the residual stream: its output equals its input."""
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


def test_bi_and_angular_find_a_block_that_does_nothing():
    model = tiny_llama(layers=4)
    _identity_block(model, 2)
    tokens = _tokens()
    d = span_distances(model, tokens, 1, progress=False)
    assert d["cos"][2] == pytest.approx(1.0, abs=1e-6) and d["angular"][2] < 1e-3
    assert choose_blocks(model, tokens, 1, "bi", progress=False)[0] == [2]
    assert choose_blocks(model, tokens, 1, "angular", progress=False)[0] == [2]
    # with two to drop, the angular span must be contiguous and contain the identity block
    span, why = choose_blocks(model, tokens, 2, "angular", progress=False)
    assert span in ([1, 2], [2, 3]) and len(why["angular_distance"]) == 3


@torch.no_grad()
def test_greedy_ppl_picks_the_block_whose_removal_hurts_least():
    import torch.nn.functional as F
    model = tiny_llama(layers=4)
    tokens = _tokens(3, 24)

    def nll(skip):
        logits = _skip_forward(model, tokens, skip)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()

    order, rounds = greedy_ppl(model, tokens, 2, progress=False)
    losses = {c: nll({c}) for c in range(4)}
    assert order[0] == min(losses, key=losses.get)
    assert rounds[0]["ppl"] == pytest.approx(torch.tensor(losses[order[0]]).exp().item(), rel=1e-4)
    second = {c: nll({order[0], c}) for c in range(4) if c != order[0]}
    assert order[1] == min(second, key=second.get)


def test_depth_pruning_refusals():
    model = tiny_llama(layers=3)
    with pytest.raises(LLMPressError, match="distinct indices"):
        drop_blocks(model, [0, 1, 2])
    with pytest.raises(LLMPressError, match="distinct indices"):
        drop_blocks(model, [5])
    with pytest.raises(LLMPressError, match="unknown block criterion"):
        choose_blocks(model, _tokens(), 1, "random")
    with pytest.raises(LLMPressError, match="at least one"):
        blocks_to_drop(model, 0.1)
    assert blocks_to_drop(tiny_llama(layers=8), 0.25) == 2


def _correlated(n=48, out=16, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g)
    return torch.randn(out, n, generator=g, dtype=torch.float64), (X.T @ X / tokens).double()


def _output_error(W, H, keep, W_new):
    D = W.clone()
    D[:, keep] -= W_new
    return ((D @ H) * D).sum().item()


def test_obs_leaves_the_kept_columns_at_the_least_squares_refit():
    W, H = _correlated()
    keep, W_obs = obs_columns(W, H, remove=20, damp=0.01, rounds=7)
    assert keep.numel() == 28 and torch.equal(keep, keep.sort().values)
    assert torch.allclose(W_obs, refit(W, H, keep, damp=0.01), atol=1e-8)
    # the refit beats keeping the columns as they were, and both criteria beat a random choice
    assert _output_error(W, H, keep, W_obs) < 0.5 * _output_error(W, H, keep, W[:, keep])
    keep_w, W_w = choose_neurons(W, H, 28, "wanda")
    random = torch.randperm(48, generator=torch.Generator().manual_seed(3))[:28].sort().values
    err = {name: _output_error(W, H, k, Wk) for name, k, Wk in
           (("obs", keep, W_obs), ("wanda", keep_w, W_w), ("random", random, refit(W, H, random)))}
    assert err["obs"] < err["random"] and err["wanda"] < err["random"]
    assert err["obs"] <= err["wanda"] * 1.001


@torch.no_grad()
@pytest.mark.parametrize("criterion", ["obs", "wanda"])
def test_width_pruning_gives_a_standard_smaller_config(criterion, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM
    from llmpress.formats import export_dense
    base = tiny_llama(layers=2)
    model = copy.deepcopy(base)
    tokens = _tokens(8, 32)
    info = prune_width(model, tokens, 64, criterion, progress=False)
    assert model.config.intermediate_size == 64 and info["intermediate_after"] == 64
    for block in model.model.layers:
        assert block.mlp.gate_proj.weight.shape == (64, 64) and block.mlp.down_proj.weight.shape == (64, 64)
    assert all(0 < e < 1 for e in info["relative_output_error"])
    # the refit matters: keeping the same neurons' columns unrefit is further from the dense model
    sliced = copy.deepcopy(base)
    for b_new, b_old in zip(model.model.layers, sliced.model.layers):
        keep = [j for j in range(128) if any(torch.equal(b_new.mlp.up_proj.weight[r], b_old.mlp.up_proj.weight[j])
                                             for r in range(64))]
        assert len(keep) == 64
        for name in ("gate_proj", "up_proj"):
            getattr(b_old.mlp, name).weight = torch.nn.Parameter(getattr(b_old.mlp, name).weight[keep])
        b_old.mlp.down_proj.weight = torch.nn.Parameter(b_old.mlp.down_proj.weight[:, keep])
    ref = base(tokens).logits
    assert (model(tokens).logits - ref).square().mean() < (sliced(tokens).logits - ref).square().mean()
    out = export_dense(model, tiny_tokenizer, tmp_path / "dense")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.intermediate_size == 64
    assert torch.allclose(back(tokens).logits, model(tokens).logits, atol=1e-5)


def test_width_pruning_refusals():
    model = tiny_llama()
    with pytest.raises(LLMPressError, match="must keep some"):
        kept_width(model, 0.9, multiple_of=64)
    assert kept_width(model, 0.5, multiple_of=32) == 64
    with pytest.raises(LLMPressError, match="in \\(0, 1\\)"):
        kept_width(model, 1.0)
    with pytest.raises(LLMPressError, match="unknown width criterion"):
        prune_width(model, _tokens(), 64, "random", progress=False)
    from test_moe import tiny_moe
    with pytest.raises(LLMPressError, match="dense MLPs"):
        prune_width(tiny_moe("qwen3_moe"), _tokens(), 64, progress=False)


def test_cli_drops_blocks_and_prunes_width_then_compresses(tmp_path, tiny_hf_dir):
    from llmpress.export import load_compressed
    code, out, js = compress_cli(tiny_hf_dir, tmp_path, "--drop-blocks", "1", "--prune-width", "0.5",
                                 "--width-multiple", "32", "--method", "rtn", "--bits", "8")
    assert code == 0
    manifest = json.loads((out / "llmpress.json").read_text())
    s = manifest["structural_pruning"]
    assert s["depth"]["blocks_after"] == s["depth"]["blocks_before"] - 1
    assert s["width"]["intermediate_after"] == 64
    model = load_compressed(out, runtime="rebuild")[0]
    assert model.config.num_hidden_layers == s["depth"]["blocks_after"] and model.config.intermediate_size == 64
    # alone, without a method: only the structure changes
    (tmp_path / "b").mkdir()
    code, out2, _ = compress_cli(tiny_hf_dir, tmp_path / "b", "--drop-blocks", "1", "--block-criterion", "ppl")
    assert code == 0 and json.loads((out2 / "llmpress.json").read_text())["structural_pruning"]["depth"]["rounds"]


def test_depth_and_width_pruned_model_exports_to_gguf_and_runs_in_llamacpp(tmp_path):
    from transformers import AutoModelForCausalLM
    from conftest import bpe_tokenizer
    from test_gguf_arch import VOCAB, assert_llamacpp_agrees, tiny_model
    bpe_tokenizer = bpe_tokenizer(VOCAB)
    from llmpress.gguf_export import export_gguf, tokenizer_metadata
    pytest.importorskip("xllamacpp")
    model = tiny_model("qwen2")
    n = model.config.num_hidden_layers
    tokens = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    drop_blocks(model, [0])
    prune_width(model, tokens, model.config.intermediate_size // 2, progress=False)
    fields, _ = tokenizer_metadata(bpe_tokenizer, VOCAB)
    types = export_gguf(model, tmp_path / "m.gguf", tokenizer_fields=fields)
    assert not any(k.startswith(f"blk.{n - 1}.") for k in types)
    model.config.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=model.config).eval()
    ids = tokens[:2, :16]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert_llamacpp_agrees(tmp_path / "m.gguf", model, bpe_tokenizer)
