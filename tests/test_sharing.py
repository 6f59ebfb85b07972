"""Basis Sharing (llmpress.sharing): one input-side basis per projection type shared by a group of
consecutive blocks, stored once."""
import copy

import pytest
import torch
from safetensors import safe_open

from conftest import compress_cli, tiny_llama
from llmpress import Plan, SVDLLM
from llmpress.arch import adapter_for
from llmpress.errors import LLMPressError
from llmpress.eval import model_size
from llmpress.export import load_compressed, save_compressed, weights_file
from llmpress.methods.lowrank import whitened_svd_factors
from llmpress.modules import LowRankLinear
from llmpress.pipeline import compress
from llmpress.sharing import SHARED, share_basis, share_factors, shared_rank


def test_one_layer_share_is_svd_llm():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 32, generator=g), torch.randn(200, 32, generator=g)
    gram = (x.T @ x).double()
    (up,), down, _ = share_factors([w], gram, 8)
    ref_up, ref_down, _ = whitened_svd_factors(w, gram, 8)
    assert torch.equal(up, ref_up) and torch.equal(down, ref_down)
    assert shared_rank(48, 32, 1, 0.5) == 48 * 32 // 2 // 80


def test_shared_basis_is_one_tensor_counted_and_saved_once(tmp_path, calib_tokens):
    model = tiny_llama(layers=4)
    base = copy.deepcopy(model)
    info = share_basis(model, calib_tokens, group=2, param_ratio=0.6, progress=False)
    blocks = model.model.layers
    for local in SHARED:
        for a, b in ((0, 1), (2, 3)):
            ma, mb = blocks[a].get_submodule(local), blocks[b].get_submodule(local)
            assert isinstance(ma, LowRankLinear) and ma.down is mb.down        # the same tensor
            assert not torch.equal(ma.up, mb.up)                              # own coefficients
        assert blocks[1].get_submodule(local).down is not blocks[2].get_submodule(local).down
    for local in ("self_attn.o_proj", "mlp.down_proj"):
        assert blocks[0].get_submodule(local).down is not blocks[1].get_submodule(local).down
    # bytes as stored: each shared basis once
    expected = 0
    for i, block in enumerate(blocks):
        for local in (*SHARED, "self_attn.o_proj", "mlp.down_proj"):
            m = block.get_submodule(local)
            expected += m.up.numel() * 2 + (m.down.numel() * 2 if local not in SHARED or i % 2 == 0 else 0)
    size = model_size(model)
    assert size["bytes"] == expected
    dense_params = model_size(base)["params"]
    assert size["bytes"] / 2 <= 0.6 * dense_params                    # the ratio holds (fp16 factors)
    assert all(0 < v["relative_output_error"] < 1 for v in info["layers"].values())
    with torch.no_grad():
        logits = model(calib_tokens).logits
        assert not torch.allclose(logits, base(calib_tokens).logits, atol=1e-3)
    out = save_compressed(model, None, tmp_path / "shared", {"source_model": "tiny"})
    with safe_open(str(weights_file(out)), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.down" in keys and "model.layers.1.self_attn.q_proj.down" not in keys
    loaded, _ = load_compressed(out, runtime="rebuild")
    assert loaded.model.layers[0].self_attn.q_proj.down is loaded.model.layers[1].self_attn.q_proj.down
    assert model_size(loaded)["bytes"] == expected
    with torch.no_grad():
        assert torch.equal(loaded(calib_tokens).logits, logits)


def test_group_of_one_equals_the_svd_llm_pipeline(calib_tokens):
    model = tiny_llama(layers=3)
    ref = copy.deepcopy(model)
    share_basis(model, calib_tokens, group=1, param_ratio=0.7, progress=False)
    names = adapter_for(ref).linear_names(ref)
    compress(ref, Plan.uniform(SVDLLM(param_ratio=0.7)).resolve(names), calib_tokens, progress=False)
    assert model_size(model)["bytes"] == model_size(ref)["bytes"]
    with torch.no_grad():
        torch.testing.assert_close(model(calib_tokens).logits, ref(calib_tokens).logits, atol=1e-4, rtol=1e-4)


def test_sharing_refusals(calib_tokens):
    model = tiny_llama(layers=2)
    for group, ratio in ((0, 0.8), (3, 0.8), (2, 1.5)):
        with pytest.raises(LLMPressError):
            share_basis(copy.deepcopy(model), calib_tokens, group=group, param_ratio=ratio, progress=False)
    share_basis(model, calib_tokens, group=2, param_ratio=0.8, progress=False)
    with pytest.raises(LLMPressError, match="still dense"):
        share_basis(model, calib_tokens, group=2, progress=False)


def test_cli_share_basis_round_trip(tmp_path, tiny_hf_dir):
    code, out, js = compress_cli(tiny_hf_dir, tmp_path, "--share-basis", "2", "--share-ratio", "0.7")
    assert code == 0
    loaded, tok = load_compressed(out, runtime="rebuild")
    assert loaded.model.layers[0].mlp.up_proj.down is loaded.model.layers[1].mlp.up_proj.down
    import json
    manifest = json.loads((out / "llmpress.json").read_text())
    assert manifest["structural_pruning"]["basis_sharing"]["group"] == 2
    assert json.loads(js.read_text())["bits_per_weight"] < 16 * 0.7 + 1e-6
    (tmp_path / "s").mkdir()
    code, out_s, _ = compress_cli(tiny_hf_dir, tmp_path / "s", "--share-basis", "2", "--share-search")
    assert code == 0
    search = json.loads((out_s / "llmpress.json").read_text())["structural_pruning"]["basis_sharing"]["search"]
    assert set(search) == set(SHARED) and all(v["error"] <= v["error_private"] for v in search.values())
    (tmp_path / "b").mkdir()
    code, _, _ = compress_cli(tiny_hf_dir, tmp_path / "b", "--share-basis", "2", "--method", "rtn")
    assert code != 0


def test_search_finds_the_least_error_partition_and_it_is_used(calib_tokens):
    from itertools import product

    from llmpress.sharing import search_partition, segment_error
    from llmpress.walk import dense_statistics
    model = tiny_llama(layers=4)
    partition, info = search_partition(model, calib_tokens, 0.6, max_group=2, progress=False)
    stats = dense_statistics(model, calib_tokens)
    blocks = model.model.layers
    for local in SHARED:
        w = [b.get_submodule(local).weight.float() for b in blocks]
        h = [stats[f"model.layers.{i}.{local}"].hessian().double() for i in range(4)]
        # every partition of 4 blocks into runs of 1 or 2: the search's is the least error
        options = []
        for cuts in product([0, 1], repeat=3):
            runs, cur = [], [0]
            for i, c in enumerate(cuts, 1):
                if c or len(cur) == 2:
                    runs.append(cur)
                    cur = [i]
                else:
                    cur.append(i)
            runs.append(cur)
            if all(len(r) <= 2 for r in runs) and runs not in [o[1] for o in options]:
                options.append((sum(segment_error(w[r[0]:r[-1] + 1], h[r[0]:r[-1] + 1], 0.6) for r in runs), runs))
        best = min(options)
        assert partition[local] == best[1]
        assert info[local]["error"] == pytest.approx(best[0]) and info[local]["error"] <= info[local]["error_private"]
    shared = share_basis(model, calib_tokens, 2, 0.6, partition=partition, progress=False)
    for local, runs in partition.items():
        for r in runs:
            downs = {id(blocks[i].get_submodule(local).down) for i in r}
            assert len(downs) == 1
    assert shared["partition"] == partition
    with pytest.raises(LLMPressError, match="consecutive"):
        share_basis(tiny_llama(layers=4), calib_tokens, 2, 0.6, partition={k: [[0, 2], [1, 3]] for k in SHARED},
                    progress=False)
