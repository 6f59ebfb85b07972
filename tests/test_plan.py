import json

import pytest

from llmpress import LLMPressError, Plan, RTN, Magnitude, SVD
from llmpress.config import config_from_dict, parse_method_spec

NAMES = [f"model.layers.{i}.{n}" for i in range(2)
         for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]


def test_first_match_wins_and_none_keeps_dense():
    plan = Plan([("*.mlp.*", Magnitude(sparsity=0.5)), ("model.layers.0.*", None), ("*", RTN(bits=4))])
    got = plan.resolve(NAMES)
    assert got["model.layers.0.mlp.down_proj"] == Magnitude(sparsity=0.5)
    assert "model.layers.0.self_attn.q_proj" not in got          # kept dense
    assert got["model.layers.1.self_attn.k_proj"] == RTN(bits=4)


def test_regex_patterns():
    got = Plan([("re:.*\\.(q|k)_proj", SVD(param_ratio=0.5)), ("*", None)]).resolve(NAMES)
    assert set(got) == {n for n in NAMES if n.endswith(("q_proj", "k_proj"))}


def test_rule_matching_nothing_is_an_error():
    with pytest.raises(LLMPressError, match="match no compressible layer"):
        Plan([("*.gate_proj", RTN())]).resolve(NAMES)
    # shadowed by an earlier rule: also matches nothing
    with pytest.raises(LLMPressError, match=r"\*\.down_proj"):
        Plan([("*", RTN()), ("*.down_proj", Magnitude())]).resolve(NAMES)


def test_json_round_trip(tmp_path):
    plan = Plan([("*.mlp.*", Magnitude(sparsity=None, nm="2:4")), ("*.k_proj", None),
                 ("*", RTN(bits=3, group_size=64, symmetric=False))])
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan
    assert again.resolve(NAMES) == plan.resolve(NAMES)
    assert json.loads((tmp_path / "plan.json").read_text())["version"] == 1


def test_config_parsing_and_validation():
    assert parse_method_spec("rtn:bits=3,group_size=64") == RTN(bits=3, group_size=64)
    assert parse_method_spec("magnitude:nm=2:4,sparsity=none") == Magnitude(sparsity=None, nm="2:4")
    assert config_from_dict(RTN(bits=5).to_dict()) == RTN(bits=5)
    for bad in ({"method": "rtn", "bits": 1}, {"method": "rtn", "bits": 9},
                {"method": "magnitude", "sparsity": 1.0}, {"method": "magnitude", "sparsity": -0.1},
                {"method": "magnitude", "sparsity": None, "nm": "4:4"},
                {"method": "magnitude", "sparsity": None, "nm": "5:4"},
                {"method": "svd", "param_ratio": 0}, {"method": "nope"},
                {"method": "rtn", "colour": "red"}):
        with pytest.raises(LLMPressError):
            config_from_dict(bad)
