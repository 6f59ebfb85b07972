"""--target, --recipe and `llmpress plan` on the tiny model: each target's output loads in its runtime
with llmpress's logits, a plan a target cannot serve is refused before any work, a recorded recipe
re-runs bit for bit, unknown recipe fields are refused."""
import json

import pytest
import torch

from test_cli import _run, text_file  # noqa: F401  (the CLI helper and its calibration-text fixture)
from llmpress.errors import LLMPressError


def _calib(text_file):
    return ["--calib", text_file, "--num-samples", "4", "--seq-len", "32", "--sample-windows", "2"]


def _ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_recipe_from_a_manifest_reruns_bit_for_bit(tiny_hf_dir, tmp_path, text_file, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--method", "gptq", "--bits", "3",
                        "--group-size", "32", "--clip", "mse", *_calib(text_file), "--out", a)
    assert code == 0, err
    manifest = json.loads((a / "llmpress.json").read_text())
    recipe = manifest["recipe"]
    assert recipe["method"] == "gptq" and recipe["bits"] == 3 and recipe["target"] == "llmpress"
    assert "model" not in recipe and "out" not in recipe and "device" not in recipe
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--recipe", a / "llmpress.json", "--out", b)
    assert code == 0, err
    again = json.loads((b / "llmpress.json").read_text())
    assert again["recipe"] == recipe
    assert again["files"]["llmpress.safetensors"] == manifest["files"]["llmpress.safetensors"]   # same bytes


def test_flags_override_recipe_fields_and_unknown_fields_are_refused(tiny_hf_dir, tmp_path, text_file, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("method: rtn\nbits: 8\ngroup-size: 32\n")
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--recipe", r, "--bits", "4", "--out", tmp_path / "o")
    assert code == 0, err
    layers = json.loads((tmp_path / "o" / "llmpress.json").read_text())["layers"]
    assert {v["bits"] for v in layers.values()} == {4} and {v["group_size"] for v in layers.values()} == {32}
    for text, why in (('{"bitz": 3}', "unknown field 'bitz'"), ('{"bits": "four"}', "is not what --bits takes"),
                      ('{"out": "x"}', "machine setting"), ('{"target": "tgi"}', "choose from")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--recipe", bad, "--method", "rtn",
                            "--out", tmp_path / "never")
        assert code == 2 and why in err, (text, err)
        assert not (tmp_path / "never").exists()
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--recipe", "no-such-preset", "--out", tmp_path / "n")
    assert code == 2 and "no such preset" in err and "gguf-4bit" in err


def test_a_plan_the_target_cannot_serve_is_refused_before_work(tiny_hf_dir, tmp_path, text_file, capsys):
    cases = [
        (["--target", "llama.cpp", "--method", "sparsegpt", "--sparsity", "0.5"], "sparsegpt (pruning) has no llama.cpp format"),
        (["--target", "llama.cpp", "--method", "rtn", "--bits", "4", "--group-size", "64"], "is no GGUF type"),
        (["--target", "vllm", "--method", "rtn", "--bits", "3", "--group-size", "32"], "3-bit weights"),
        (["--target", "transformers", "--method", "rtn", "--bits", "4", "--group-size", "32", "--asymmetric"],
         "asymmetric zero points"),
        (["--target", "vllm", "--budget", "params=0.5"], "cannot serve packed"),
        (["--target", "llama.cpp", "--method", "rtn", "--bits", "4", "--group-size", "32",
          "--online-hadamard", "mlp.down_proj"], "--online-hadamard"),
        (["--target", "vllm", "--budget", "bits=4.5", "--menu", "gptq-lut"], "the menu holds what it cannot serve"),
    ]
    for flags, why in cases:
        code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, *flags, *_calib(text_file), "--out", tmp_path / "x")
        assert code == 2 and why in err, (flags, err)
        assert not (tmp_path / "x").exists()
    # vLLM fuses q/k/v: a plan giving them different schemes is refused, naming the layers
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"rules": [
        {"pattern": "*.q_proj", "config": {"method": "rtn", "bits": 8, "group_size": 0}},
        {"pattern": "*", "config": {"method": "rtn", "bits": 4, "group_size": 32}}]}))
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--target", "vllm", "--plan", plan, "--out", tmp_path / "x")
    assert code == 2 and "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj" in err and "one scheme" in err


def test_target_llama_cpp_preset_writes_a_gguf_that_transformers_reads(tiny_hf_dir, tmp_path, text_file, capsys):
    """--recipe gguf-4bit: the llama.cpp menu allocated to 4.5 bits (only 32-block types fit 64-wide
    rows), the GGUF written at the end holds exactly llmpress's weights."""
    import gguf
    from transformers import AutoModelForCausalLM
    from llmpress.models import load_model
    out = tmp_path / "g"
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--recipe", "gguf-4bit", *_calib(text_file), "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "llmpress.json").read_text())
    assert manifest["recipe"]["target"] == "llama.cpp" and "gguf=iq4_nl" in manifest["recipe"]["menu"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    linears = [v for k, v in types.items() if k.startswith("blk.") and not k.endswith("norm.weight")]
    assert linears and set(linears) <= {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL"}
    ours, _ = load_model(str(out), runtime="rebuild")
    theirs = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    assert torch.equal(theirs(_ids()).logits, ours(_ids()).logits)


def test_target_llama_cpp_output_runs_in_llama_cpp(tmp_path, text_file, capsys):
    """--target llama.cpp --budget bits=5: llama.cpp itself (the xllamacpp wheel) loads OUT/model.gguf
    and predicts llmpress's next tokens (it rounds activations to Q8_0 for these matmuls: within 5e-2)."""
    pytest.importorskip("xllamacpp")
    from conftest import bpe_tokenizer, tiny_llama
    from test_gguf_arch import VOCAB, assert_llamacpp_agrees
    from llmpress.models import load_model
    src, out, tokenizer = tmp_path / "src", tmp_path / "g", bpe_tokenizer(290)     # llama.cpp needs merges
    tiny_llama(vocab_size=VOCAB).save_pretrained(src)
    tokenizer.save_pretrained(src)
    code, _, err = _run(capsys, "compress", "--model", src, "--target", "llama.cpp", "--budget", "bits=5",
                        *_calib(text_file), "--out", out)
    assert code == 0, err
    import gguf
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    linears = {v for k, v in types.items() if k.startswith("blk.") and not k.endswith("norm.weight")}
    assert linears and linears <= {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL"}                # every block linear quantized
    ours, _ = load_model(str(out), runtime="rebuild")
    assert_llamacpp_agrees(out / "model.gguf", ours, tokenizer, tol=5e-2)


def test_target_vllm_budget_writes_compressed_tensors_with_fused_layers_alike(tiny_hf_dir, tmp_path, text_file, capsys):
    from transformers import AutoModelForCausalLM
    from llmpress.models import load_model
    out = tmp_path / "v"
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--target", "vllm", "--budget", "bits=5",
                        *_calib(text_file), "--out", out)
    assert code == 0, err
    layers = json.loads((out / "llmpress.json").read_text())["layers"]
    for i in range(2):
        p = f"model.layers.{i}."
        assert layers[p + "self_attn.q_proj"] == layers[p + "self_attn.k_proj"] == layers[p + "self_attn.v_proj"]
        assert layers[p + "mlp.gate_proj"] == layers[p + "mlp.up_proj"]
    assert {v["bits"] for v in layers.values() if v} <= {4, 8}
    ours, _ = load_model(str(out), runtime="rebuild")
    theirs = AutoModelForCausalLM.from_pretrained(out / "compressed-tensors")
    torch.testing.assert_close(theirs(_ids()).logits, ours(_ids()).logits, rtol=1e-4, atol=1e-4)


def test_plan_command_allocates_without_compressing(tiny_hf_dir, tmp_path, text_file, capsys, monkeypatch):
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))
    plan, js = tmp_path / "p.json", tmp_path / "a.json"
    args = ["plan", "--model", tiny_hf_dir, "--target", "transformers", "--budget", "bits=4", *_calib(text_file)]
    code, out, err = _run(capsys, *args, "--plan-out", plan, "--json", js)
    assert code == 0, err
    assert "predicted loss increase" in out and plan.is_file()
    info = json.loads(js.read_text())["allocation"]
    assert info["bits_per_weight"] <= 4.0 and info["predicted_error"] >= 0
    from llmpress import budget as budget_mod

    def boom(*a, **k):
        raise AssertionError("sensitivity re-measured")
    monkeypatch.setattr(budget_mod, "measure_sensitivity", boom)       # the second run reads the cached table
    code, out, err = _run(capsys, *args)
    assert code == 0 and "sensitivity table read from" in out, err
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--target", "transformers", "--plan", plan,
                        *_calib(text_file), "--out", tmp_path / "c")
    assert code == 0, err
    assert (tmp_path / "c" / "compressed-tensors" / "config.json").is_file()
    code, _, err = _run(capsys, "plan", "--model", tiny_hf_dir, "--method", "rtn")
    assert code == 2 and "plan allocates a --budget" in err


def test_python_api_is_the_cli_call(tiny_hf_dir, tmp_path, text_file, capsys):
    """llmpress.workflow.compress with a Recipe: the same run as the CLI, with option overrides."""
    from llmpress import Recipe
    from llmpress.workflow import compress
    r = Recipe.resolve({"method": "rtn", "bits": 8}, bits=4, group_size=32)
    assert (r.bits, r.group_size, r.target) == (4, 32, "llmpress")
    with pytest.raises(AttributeError, match="immutable"):
        r.bits = 3
    assert r.replace(bits=3).bits == 3 and r.bits == 4
    result = compress(str(tiny_hf_dir), str(tmp_path / "py"), r)
    manifest = json.loads((tmp_path / "py" / "llmpress.json").read_text())
    assert result["bits_per_weight"] < 5 and manifest["recipe"] == r.to_dict()
    assert Recipe.resolve(str(tmp_path / "py")) == r      # an output re-runs its recipe
    code, _, err = _run(capsys, "compress", "--model", tiny_hf_dir, "--method", "rtn", "--bits", "4",
                        "--group-size", "32", "--out", tmp_path / "cli")
    assert code == 0, err
    assert json.loads((tmp_path / "cli" / "llmpress.json").read_text())["recipe"] == r.to_dict()
    from safetensors.torch import load_file
    a, b = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("py", "cli"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LLMPressError, match="unknown field 'bitz'"):
        compress(str(tiny_hf_dir), str(tmp_path / "never"), bitz=3)
    from llmpress.workflow import plan
    calib = {"calib": str(text_file), "num_samples": 4, "seq_len": 32, "sample_windows": 2}
    p = plan(str(tiny_hf_dir), "vllm-4bit", **calib)          # the allocation alone, its Plan as data
    assert p["recipe"]["target"] == "vllm" and p["allocation"]["bits_per_weight"] <= 4.5
    planned = compress(str(tiny_hf_dir), str(tmp_path / "planned"), target="vllm", plan=p["plan"], **calib)
    assert planned["bits_per_weight"] == pytest.approx(p["allocation"]["bits_per_weight"])
    with pytest.raises(LLMPressError, match="is not what --bits takes"):
        r.replace(bits="four")
    assert not (tmp_path / "never").exists()


def test_knapsack_reaches_a_budget_at_exactly_the_cheapest_choice():
    """Rounding every cost up used to push a budget equal to the cheapest choice out of reach."""
    from llmpress.allocate import knapsack
    from llmpress.budget import Budget, Table
    opts = lambda: [{"bytes": 1000 + 7, "params": 10, "error": 1.0, "label": "a"},
                    {"bytes": 3001, "params": 10, "error": 0.5, "label": "b"}]
    table = Table({f"l{i}": {"out": 1, "in": 10, "params": 10, "options": opts()} for i in range(7)}, {})
    budget = Budget("bytes", 7 * 1007)
    assert set(knapsack(table, budget).values()) == {0}
    assert sorted(knapsack(table, Budget("bytes", 6 * 1007 + 3001)).values()) == [0] * 6 + [1]


def test_llama_cpp_default_recipe_estimates_the_table_unless_told_not_to():
    """bench/README.md "Estimated sensitivity": the llama.cpp target's default takes the estimated
    table (458 s vs ~4,400 s measured, plan +0.6 %); --no-estimate-sensitivity measures it."""
    import argparse
    from llmpress import Recipe
    from llmpress.cli import _parser, _recipe_of
    assert Recipe.resolve("gguf-4bit").estimate_sensitivity is True
    assert Recipe.resolve("vllm-4bit").estimate_sensitivity is False
    assert Recipe.resolve("gguf-4bit", estimate_sensitivity=False).estimate_sensitivity is False
    for flag, want in (("--no-estimate-sensitivity", False), ("--estimate-sensitivity", True)):
        argv = ["plan", "--model", "m", "--target", "llama.cpp", "--budget", "bits=4.5", flag]
        a = _parser().parse_args(argv)
        assert _recipe_of(a, argv).estimate_sensitivity is want
    argv = ["plan", "--model", "m", "--target", "vllm", "--budget", "bits=4.5"]
    assert _recipe_of(_parser().parse_args(argv), argv).estimate_sensitivity is False
    with pytest.raises(LLMPressError, match="estimate_sensitivity"):
        Recipe.resolve(None, estimate_sensitivity="yes")
