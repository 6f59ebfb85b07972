import pytest
import torch

from llmpress import LLMPressError
from llmpress.data import calibration_tokens, data_dirs, eval_tokens, load_text
from llmpress.eval import perplexity


def test_calibration_sampling_is_seeded_and_disjoint(tiny_tokenizer, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    a = calibration_tokens(tiny_tokenizer, str(text), 4, 16, seed=0)
    b = calibration_tokens(tiny_tokenizer, str(text), 4, 16, seed=0)
    c = calibration_tokens(tiny_tokenizer, str(text), 4, 16, seed=1)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_too_little_calibration_text(tiny_tokenizer, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("the quick brown fox")
    with pytest.raises(LLMPressError, match="fewer than the 8 samples"):
        calibration_tokens(tiny_tokenizer, str(text), 8, 16, seed=0)
    with pytest.raises(LLMPressError, match="num_samples"):
        calibration_tokens(tiny_tokenizer, str(text), 0, 16, seed=0)


def test_refuses_to_calibrate_on_evaluation_text(tiny_tokenizer, tmp_path, monkeypatch):
    with pytest.raises(LLMPressError, match="evaluation text"):
        calibration_tokens(tiny_tokenizer, "wikitext2", 4, 16, seed=0)
    # the same content under another name is refused too
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text("eval text " * 500)
    copy = tmp_path / "innocent.txt"
    copy.write_text("eval text " * 500)
    monkeypatch.setenv("LLMPRESS_DATA_DIR", str(data))
    with pytest.raises(LLMPressError, match="never calibrate"):
        calibration_tokens(tiny_tokenizer, str(copy), 4, 16, seed=0)


def test_data_dir_env_takes_precedence(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("hello")
    monkeypatch.setenv("LLMPRESS_DATA_DIR", str(tmp_path))
    assert data_dirs()[0] == tmp_path
    assert load_text("wikitext2") == "hello"


def test_unknown_source_and_bad_utf8(tmp_path):
    with pytest.raises(LLMPressError, match="unknown text source"):
        load_text("no-such-source")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(LLMPressError, match="UTF-8"):
        load_text(str(bad))


def test_perplexity_protocol(tiny_model):
    """Non-overlapping windows from token 0, tail dropped, exp(mean of window losses)."""
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    res = perplexity(tiny_model, ids, seq_len=32, progress=False)
    assert res["windows"] == 3 and res["seq_len"] == 32
    losses = []
    for i in range(3):
        w = ids[i * 32:(i + 1) * 32]
        logits = tiny_model(w[None]).logits[0, :-1]
        losses.append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
    assert res["perplexity"] == pytest.approx(torch.tensor(losses).mean().exp().item(), rel=1e-5)
    assert perplexity(tiny_model, ids, seq_len=32, max_windows=2, progress=False)["windows"] == 2
    with pytest.raises(LLMPressError, match="fewer than one window"):
        perplexity(tiny_model, ids[:10], seq_len=32, progress=False)


def test_a_local_corpus_that_is_missing_is_a_clear_error(monkeypatch, tmp_path):
    from llmpress import data
    from llmpress.errors import LLMPressError
    monkeypatch.setattr(data, "data_dirs", lambda: [tmp_path])
    with pytest.raises(LLMPressError, match="LLMPRESS_DATA_DIR"):
        data.load_text("wikipedia")
