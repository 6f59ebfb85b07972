"""PARSE (prompt-aware rank selection): the routed low-rank layer and its router training."""
import pytest
import torch

from llmpress import LLMPressError, Plan
from llmpress.arch import adapter_for
from llmpress.config import config_from_dict
from llmpress.methods.lowrank import SVDLLM
from llmpress.methods.parse import PARSE, fit_routers
from llmpress.modules import RoutedLowRankLinear
from llmpress.pipeline import compress


def _tokens(n=8, t=48, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _compressed(config):
    from conftest import tiny_llama
    model = tiny_llama()
    compress(model, Plan.uniform(config).resolve(adapter_for(model).linear_names(model)), _tokens(), progress=False)
    return model


def test_untrained_router_is_exactly_svd_llm_at_the_running_rank():
    """Before training, every prompt runs the static pattern: the largest singular values, i.e.
    SVD-LLM at the rank a token runs; the layer stores more components than it runs."""
    parse, static = _compressed(PARSE(param_ratio=0.5, groups=4, active=2, route_tokens=8)), None
    layer = next(m for m in parse.modules() if isinstance(m, RoutedLowRankLinear))
    static = _compressed(SVDLLM(param_ratio=0.5))
    lr = dict(static.named_modules())[next(n for n, m in parse.named_modules() if m is layer)]
    assert layer.rank == lr.rank and layer.up.shape[1] > layer.rank
    assert torch.allclose(layer.dense_weight(), lr.dense_weight(), atol=1e-3, rtol=1e-3)
    ids = _tokens(2, 24, seed=5)
    assert torch.allclose(parse(ids).logits, static(ids).logits, atol=1e-3, rtol=1e-3)


def test_routed_forward_is_causal_and_the_pattern_is_kept_for_decoding():
    torch.manual_seed(0)
    up, down = torch.randn(12, 10), torch.randn(10, 16)
    router = torch.randn(4, 17) * 0.01
    router[:, -1] = torch.tensor([0.0, 0.0, 5.0, 5.0])      # this prompt takes groups 2 and 3, not the static 0, 1
    m = RoutedLowRankLinear(up, down, router, shared=2, groups=4, active=2, route_tokens=3)
    assert m.rank == 2 + 2 * 2 and m.group_size == 2
    x = torch.randn(1, 7, 16)
    y = m(x)
    pattern = m._pattern[0]
    assert pattern.tolist() == [2, 3]
    static = m.components(m.static_groups())
    routed = m.components(pattern)
    upf, downf = m.up.float(), m.down.float()
    assert torch.allclose(y[0, :3], x[0, :3] @ downf[static].T @ upf[:, static].T, atol=1e-5)
    assert torch.allclose(y[0, 3:], x[0, 3:] @ downf[routed].T @ upf[:, routed].T, atol=1e-5)
    x2 = x.clone()
    x2[0, 5:] += 10                                          # later tokens change neither the pattern
    assert torch.equal(m(x2)[0, :5], y[0, :5])               # nor any earlier output
    step = torch.randn(1, 1, 16)
    assert torch.allclose(m(step)[0, 0], step[0, 0] @ downf[routed].T @ upf[:, routed].T, atol=1e-5)
    assert len(m._gathered) == 2                             # the prompt's factors, gathered once


def test_trained_routers_choose_per_prompt_and_capture_more_energy_than_static():
    """Two kinds of prompt whose inputs load different groups: the router learns to tell them apart."""
    torch.manual_seed(0)
    d, g = 16, 4
    up, down = torch.linalg.qr(torch.randn(d, d))[0][:, :8], torch.eye(d)[:8]
    router = torch.zeros(g, d + 1)
    router[:, -1] = -torch.arange(g, dtype=torch.float32)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = RoutedLowRankLinear(up, down, router, shared=0, groups=g, active=1, route_tokens=4)

        def forward(self, kind):                             # kind (N, T): 0 or 1 per window
            x = torch.randn(*kind.shape, d) * 0.1
            x[..., 6:8] += kind[..., None].float() * 3       # kind 1 loads group 3 (components 6, 7)
            x[..., 0:2] += (1 - kind[..., None].float()) * 3  # kind 0 loads group 0
            return self.layer(x)
    toy = Toy()
    kinds = torch.tensor([0, 1] * 8)[:, None].expand(16, 12).contiguous()
    report = fit_routers(toy, kinds, progress=False)
    r = report["layer"]
    assert r["kept"] and r["heldout_share_routed"] > r["heldout_share_static"] + 0.3
    toy(torch.ones(1, 12, dtype=torch.long))
    assert toy.layer._pattern.tolist() == [[3]]
    toy(torch.zeros(1, 12, dtype=torch.long))
    assert toy.layer._pattern.tolist() == [[0]]


def test_parse_costs_save_reload_and_exports_refuse(tmp_path):
    from conftest import tiny_llama
    from llmpress.export import load_compressed, save_compressed
    from llmpress.formats import export_folder
    from llmpress.modules import linear_bytes
    config = PARSE(param_ratio=0.5, groups=4, active=2, route_tokens=8)
    model = tiny_llama()
    names = adapter_for(model).linear_names(model)
    compress(model, Plan.uniform(config).resolve(names), _tokens(), progress=False)
    fit_routers(model, _tokens(8, 48, seed=1), progress=False)
    for n in names:
        m = model.get_submodule(n)
        assert linear_bytes(m) == config.storage(m.out_features, m.in_features)[0]
    ids = _tokens(2, 24, seed=7)
    before = model(ids).logits
    save_compressed(model, None, tmp_path / "p", {"source_model": "tiny"})
    loaded, _ = load_compressed(tmp_path / "p", runtime="rebuild")
    assert torch.equal(loaded(ids).logits, before)
    with pytest.raises(LLMPressError, match="PARSE layers"):
        export_folder(tmp_path / "p", "dense", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_bad_parse_settings_are_refused():
    for bad in ({"active": 4, "groups": 4}, {"shared": 1.0}, {"route_tokens": 0}, {"param_ratio": 1.2}):
        with pytest.raises(LLMPressError):
            config_from_dict({"method": "parse", **bad})
    assert PARSE(param_ratio=0.9, groups=32).shape_problem(64, 64) and not PARSE().shape_problem(64, 64)
