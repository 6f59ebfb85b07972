"""Tests on the embedded SmolLM2-135M. The `slow` ones run with `make test-slow` (minutes each)."""
import math

import pytest
import torch

from conftest import needs_embedded
from llmpress import Magnitude, Plan, RTN, SVD
from llmpress.arch import adapter_for

pytestmark = needs_embedded


@pytest.fixture(scope="module")
def smollm():
    from llmpress.models import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def wikitext_ids(smollm):
    from llmpress.data import eval_tokens
    return eval_tokens(smollm[1], "wikitext2")


@pytest.mark.model
def test_embedded_model_loads_as_float32_llama(smollm):
    model, tokenizer = smollm
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    names = adapter_for(model).linear_names(model)
    assert len(names) == 30 * 7 and names[0] == "model.layers.0.self_attn.q_proj"
    assert tokenizer("Hello world").input_ids


@pytest.mark.model
def test_rtn_group_128_on_576_columns(smollm):
    """576 input columns are not a multiple of 128: the last group holds 64 columns."""
    from llmpress.methods.rtn import apply_rtn
    linear = smollm[0].model.layers[0].self_attn.q_proj
    q, _ = apply_rtn(linear, RTN(bits=4, group_size=128), None)
    assert q.scale.shape == (576, 5)
    rel = (q.dense_weight() - linear.weight).norm() / linear.weight.norm()
    assert 0 < rel < 0.2


@pytest.fixture(scope="module")
def dense_ppl(smollm, wikitext_ids):
    from llmpress.eval import perplexity
    return perplexity(smollm[0], wikitext_ids, 2048, 20, progress=False)


@pytest.mark.slow
def test_dense_perplexity_matches_reference(dense_ppl):
    assert dense_ppl["windows"] == 20
    assert dense_ppl["perplexity"] == pytest.approx(20.97, abs=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("config", [RTN(bits=4, group_size=128), RTN(bits=4, group_size=64),
                                    Magnitude(sparsity=0.5), Magnitude(sparsity=None, nm="2:4"),
                                    SVD(param_ratio=0.8), RTN(bits=8, group_size=128)],
                         ids=lambda c: c.label())
def test_compress_save_reload_on_embedded(smollm, wikitext_ids, dense_ppl, config, tmp_path):
    import copy
    from llmpress.eval import model_size, perplexity
    from llmpress.export import load_compressed, save_compressed
    from llmpress.pipeline import compress

    dense, tokenizer = smollm
    model = copy.deepcopy(dense)
    compress(model, Plan.uniform(config).resolve(adapter_for(model).linear_names(model)), progress=False)
    out = save_compressed(model, tokenizer, tmp_path / "out", {})
    reloaded, _ = load_compressed(out, runtime="rebuild")
    probe = wikitext_ids[:256][None]
    assert torch.equal(reloaded(probe).logits, model(probe).logits)
    assert model_size(reloaded)["bytes"] < model_size(dense)["bytes"]
    ppl = perplexity(reloaded, wikitext_ids, 2048, 20, progress=False)["perplexity"]
    print(f"{config.label()}: perplexity {ppl:.3f} (dense {dense_ppl['perplexity']:.3f}), "
          f"{model_size(reloaded)['bits_per_weight']:.3f} bits/weight")
    assert math.isfinite(ppl) and ppl > dense_ppl["perplexity"]
    if config == RTN(bits=8, group_size=128):
        assert ppl <= 1.01 * dense_ppl["perplexity"]


@pytest.mark.model
def test_gguf_export_of_the_embedded_model(smollm, tmp_path):
    """Real shapes (9 query heads, 3 key/value heads: the q/k permutations differ) and the source
    GGUF's tokenizer and embeddings copied: transformers reads the file back with llmpress's
    logits, and its tokenizer from the file equals the original."""
    import copy
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmpress.gguf_export import export_gguf
    from llmpress.models import resolve_source
    from llmpress.pipeline import compress
    dense, tokenizer = smollm
    model = copy.deepcopy(dense)
    compress(model, Plan.uniform(RTN(bits=4, group_size=32)).resolve(adapter_for(model).linear_names(model)),
             progress=False)
    _, source = resolve_source("smollm2-135m")
    types = export_gguf(model, tmp_path / "m.gguf", source)
    assert types["blk.0.attn_k.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    probe = tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    assert torch.equal(theirs(probe).logits, model(probe).logits)
    again = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert again("The history of the Roman Empire").input_ids == probe[0].tolist()
