"""GGUF export for every architecture llmpress supports (llama, mistral, qwen2, qwen3, gemma2,
gemma3): transformers' GGUF reader gives back llmpress's logits exactly, and llama.cpp (the
xllamacpp wheel) loads the file and predicts the next token as transformers does, with the
same log-probabilities of its top candidates (llama.cpp's float32 arithmetic: within 5e-3)."""
import shutil

import pytest
import torch

from conftest import bpe_tokenizer as make_bpe_tokenizer
from llmpress.errors import LLMPressError

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def _config(kind: str):
    import transformers as T
    return {
        "llama": lambda: T.LlamaConfig(**COMMON, tie_word_embeddings=True),
        "mistral": lambda: T.MistralConfig(**COMMON, tie_word_embeddings=False, rope_theta=1e6),
        "qwen2": lambda: T.Qwen2Config(**COMMON, tie_word_embeddings=True),                   # q/k/v biases
        "qwen3": lambda: T.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),     # q/k norms
        "gemma2": lambda: T.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
        "gemma3_text": lambda: T.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 6}, head_dim=16,
                                                  query_pre_attn_scalar=16, sliding_window=8),
    }[kind]()


def tiny_model(kind: str):
    """A random model of the architecture whose norms and biases are not their init values (so a
    missing +1 or a dropped bias shows) and whose logits are spread enough to rank tokens."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
        model.get_input_embeddings().weight.normal_(0, 0.05 if kind.startswith("gemma") else 0.15)
    return model


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer with merges (llama.cpp needs them), 290 ids < VOCAB."""
    return make_bpe_tokenizer(290)


def assert_llamacpp_agrees(path, model, tokenizer, prompts: int = 4, top: int = 8, tol: float = 5e-3) -> None:
    """llama.cpp on the GGUF file: for `prompts` random prompts, its next-token choice is
    transformers' argmax and its top-`top` log-probabilities are transformers' within tol. Prompts
    whose argmax is an incomplete UTF-8 byte are skipped (llama.cpp holds such text back)."""
    from llmpress.eval import llamacpp_server
    server = llamacpp_server(path, n_ctx=64, threads=1)
    checked = tried = 0
    try:
        while checked < prompts:
            tried += 1
            assert tried < 60, "no prompt with a printable argmax"
            ids = torch.randint(3, 256, (1, 8 + tried), generator=torch.Generator().manual_seed(tried))
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            if "\ufffd" in tokenizer.decode([logp.argmax().item()]):
                continue
            r = server.handle_completions({"prompt": ids[0].tolist(), "max_tokens": 1, "temperature": 0.0, "top_k": 1,
                                           "seed": 0, "cache_prompt": False, "ignore_eos": True, "n_probs": top})
            assert r.get("choices") and r["choices"][0].get("logprobs"), f"llama.cpp gave no token: {r}"
            cands = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            assert cands[0]["id"] == logp.argmax().item()
            assert max(abs(logp[c["id"]].item() - c["logprob"]) for c in cands) < tol
            checked += 1
    finally:
        del server


KINDS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"]
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3_text": "gemma3"}


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_export_of_each_architecture(kind, tmp_path, bpe_tokenizer):
    import gguf
    from transformers import AutoModelForCausalLM
    from llmpress.gguf_export import export_gguf, tokenizer_metadata
    pytest.importorskip("xllamacpp")
    model = tiny_model(kind)
    fields, _ = tokenizer_metadata(bpe_tokenizer, VOCAB)
    types = export_gguf(model, tmp_path / "m.gguf", tokenizer_fields=fields)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == GGUF_ARCH[kind]
    if kind == "qwen2":
        assert types["blk.0.attn_q.bias"] == "F32" and types["blk.1.attn_v.bias"] == "F32"
    if kind == "qwen3":
        assert "blk.0.attn_q_norm.weight" in types and "output.weight" in types
    if kind.startswith("gemma"):
        norm = torch.from_numpy(next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight").data.copy())
        assert torch.equal(norm, model.model.layers[0].input_layernorm.weight.detach() + 1)
        assert "output.weight" not in types
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    model.config.save_pretrained(tmp_path)
    # transformers reads the tensors back exactly; its reader drops gemma's query_pre_attn_scalar and
    # qwen3's head_dim from the metadata (llama.cpp reads them: checked below), hence config=
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                **({} if kind == "mistral" else {"config": model.config})).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)
    assert_llamacpp_agrees(tmp_path / "m.gguf", model, bpe_tokenizer)


@pytest.mark.parametrize("kind", ["qwen2", "gemma3_text"])
def test_quantized_layers_of_other_architectures_export_as_their_blocks(kind, tmp_path, bpe_tokenizer):
    """GPTQ on the Q4_0 grid (and Q8_0 for the MLP) of a qwen2 (with its biases) / gemma3 model:
    the file holds those block types, transformers' reader gives llmpress's logits exactly, and
    llama.cpp agrees (it rounds the activations to Q8_0 for these matmuls: within 5e-2)."""
    from transformers import AutoModelForCausalLM
    from llmpress import GPTQ, Plan
    from llmpress.arch import adapter_for
    from llmpress.gguf_export import export_gguf, tokenizer_metadata
    from llmpress.pipeline import compress
    pytest.importorskip("xllamacpp")
    model = tiny_model(kind)
    plan = Plan([("*.mlp.*", GPTQ(bits=8, group_size=32)), ("*", GPTQ(bits=4, group_size=32))])
    tokens = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    compress(model, plan.resolve(adapter_for(model).linear_names(model)), tokens, progress=False)
    fields, _ = tokenizer_metadata(bpe_tokenizer, VOCAB)
    types = export_gguf(model, tmp_path / "m.gguf", tokenizer_fields=fields)
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model.config.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=model.config).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert_llamacpp_agrees(tmp_path / "m.gguf", model, bpe_tokenizer, tol=5e-2)


def test_gguf_export_refuses_what_llamacpp_would_compute_differently(tmp_path):
    import transformers as T
    from llmpress.gguf_arch import check_exportable
    from llmpress.gguf_export import export_gguf
    with pytest.raises(LLMPressError, match="query_pre_attn_scalar"):
        check_exportable(T.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=32))
    with pytest.raises(LLMPressError, match="layer types"):
        check_exportable(T.Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=16,
                                            layer_types=["full_attention"] * 2))
    with pytest.raises(LLMPressError, match="rotary scaling 'yarn'"):
        check_exportable(T.LlamaConfig(**COMMON, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                   "rope_theta": 1e4,
                                                                   "original_max_position_embeddings": 64}))
    with pytest.raises(LLMPressError, match="tied only"):
        check_exportable(T.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, tie_word_embeddings=False))
    assert "sliding window" in check_exportable(T.MistralConfig(**COMMON, sliding_window=64))[0]
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LLMPressError, match="gemma2, gemma3, gemma3_text, llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe; got .gpt2."):
        export_gguf(model, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path, bpe_tokenizer):
    """Llama 3.1 / 3.2 rotary scaling: the `rope_freqs` factors llama.cpp's converter writes, and
    llama.cpp then agrees with transformers on a model whose positions reach the scaled band."""
    import transformers as T
    from llmpress.gguf_export import export_gguf, tokenizer_metadata
    pytest.importorskip("xllamacpp")
    torch.manual_seed(0)
    config = T.LlamaConfig(**{**COMMON, "max_position_embeddings": 64}, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                            "rope_theta": 10000.0})
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.15)
    fields, _ = tokenizer_metadata(bpe_tokenizer, VOCAB)
    types = export_gguf(model, tmp_path / "m.gguf", tokenizer_fields=fields)
    assert types["rope_freqs.weight"] == "F32"
    assert_llamacpp_agrees(tmp_path / "m.gguf", model, bpe_tokenizer)


def test_every_gguf_grid_runs_in_llamacpp(tmp_path, bpe_tokenizer):
    """A qwen2 model (256 wide, so the 256-weight super-blocks fit) GPTQ-solved with a different
    llama.cpp grid on each layer (Q2_K .. Q6_K, Q4_1, Q5_1, IQ4_NL, IQ4_XS, IQ3_S .. IQ2_XXS): llama.cpp loads the
    file and predicts as transformers does on the same weights (its Q8 activations: within 5e-2)."""
    import transformers as T
    from llmpress import GPTQ
    from llmpress.gguf_export import export_gguf, tokenizer_metadata
    from llmpress.pipeline import compress
    pytest.importorskip("xllamacpp")
    torch.manual_seed(0)
    model = T.Qwen2ForCausalLM(T.Qwen2Config(**{**COMMON, "hidden_size": 256, "intermediate_size": 512},
                                             tie_word_embeddings=True)).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.15)
    grids = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_1", "q5_1", "iq4_nl", "iq4_xs",
             "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"]
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    configs = {n: GPTQ(gguf=grids[i % len(grids)]) for i, n in enumerate(names)}
    tokens = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    compress(model, configs, tokens, progress=False)
    fields, _ = tokenizer_metadata(bpe_tokenizer, VOCAB)
    types = export_gguf(model, tmp_path / "m.gguf", tokenizer_fields=fields)
    assert {t for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n} \
        == {g.upper() for g in grids}
    assert_llamacpp_agrees(tmp_path / "m.gguf", model, bpe_tokenizer, tol=5e-2)
