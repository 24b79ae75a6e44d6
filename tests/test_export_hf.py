"""Hugging Face export: transformers loads it with Auto* classes (no custom code), its logits,
greedy generation and tokenizer match ours, and an unrepresentable model is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_corpus

from moeops.cli import UserError
from moeops.config import make_model_args
from moeops.data.prepare import EOS, EOS_ID, train_tokenizer
from moeops.export import hf as export_hf_module
from moeops.export.hf import export_hf
from moeops.model.generate import left_pad, torch_step
from moeops.model.io import save_model_dir
from moeops.model.transformer import build_model, expert_loads, reset_expert_stats

VOCAB = 384  # what 20 generated files can teach a byte-level BPE


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    texts = [p.read_text() for p in sorted(make_corpus(root / "corpus", n_files=20).iterdir())]
    path = root / "tokenizer.json"
    train_tokenizer(texts, VOCAB).save(str(path))
    return path


def make_model_dir(out: Path, tokenizer_file: Path, **overrides):
    args = make_model_args("debug", {"vocab_size": VOCAB, **overrides})
    model = build_model(args, seed=1).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for moe in model.moe_layers():  # a non-zero balancing bias changes which experts are picked
            moe.gate.e_score_correction_bias.copy_(torch.rand(args.n_routed_experts, generator=gen) * 0.05)
    save_model_dir(out, model, tokenizer_file, {"test": True})
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_file):
    root = tmp_path_factory.mktemp("hf")
    ours = make_model_dir(root / "model", tokenizer_file)
    export_hf(root / "model", root / "hf")
    return ours, root / "hf"


def test_export_loads_with_auto_classes_and_writes_the_expected_files(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3ForCausalLM

    _, hf_dir = exported
    assert {p.name for p in hf_dir.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "lineage.json"}
    from moeops.model.io import verify_checksums

    verify_checksums(hf_dir)  # lineage.json carries the export's own checksums
    checksums = json.loads((hf_dir / "lineage.json").read_text())["checksums"]
    assert set(checksums) == {"model.safetensors", "tokenizer.json"}
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["dtype"] == "float32"
    assert "auto_map" not in config  # nothing for trust_remote_code to run
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model) is DeepseekV3ForCausalLM and model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == EOS
    assert tok.eos_token_id == model.config.eos_token_id == model.generation_config.pad_token_id == EOS_ID
    assert not list(hf_dir.parent.glob(".hf.*"))  # no temp directory left behind


def test_logits_equal_ours_with_every_expert_used(exported):
    from transformers import AutoModelForCausalLM

    ours, hf_dir = exported
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(0, VOCAB, (3, 48), generator=torch.Generator().manual_seed(2))
    reset_expert_stats(ours)
    with torch.no_grad():
        expected = ours(tokens)
        got = theirs(tokens).logits
    for load_E in expert_loads(ours):
        assert (load_E > 0).all(), f"an expert got no tokens: {load_E.tolist()}"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    for name, buf in theirs.named_buffers():  # the balancing bias is loaded and changes the routing
        if name.endswith("e_score_correction_bias"):
            buf.zero_()
    with torch.no_grad():
        assert (theirs(tokens).logits - expected).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers builds the empty experts
def test_model_without_shared_experts_loads_with_no_missing_weights(tmp_path, tokenizer_file):
    from transformers import AutoModelForCausalLM

    ours = make_model_dir(tmp_path / "model", tokenizer_file, n_shared_experts=0, q_lora_rank=0,
                          first_k_dense_replace=0, n_group=1, topk_group=1)
    export_hf(tmp_path / "model", tmp_path / "hf")
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(tokens).logits, ours(tokens), atol=1e-4, rtol=0)


def greedy(model, prompt_BS: torch.Tensor, new_tokens: int, eos: int) -> torch.Tensor:
    """Argmax decoding by full forwards (no cache); a finished row continues with EOS, as
    transformers pads it with pad_token_id = EOS."""
    out = prompt_BS
    done = torch.zeros(len(prompt_BS), dtype=torch.bool)
    for _ in range(new_tokens):
        with torch.no_grad():
            nxt = model(out)[:, -1].argmax(-1)
        nxt = torch.where(done, eos, nxt)
        done |= nxt == eos
        out = torch.cat([out, nxt[:, None]], dim=1)
        if done.all():
            break
    return out


def test_generate_equals_our_greedy_decoding(exported):
    from transformers import AutoModelForCausalLM

    ours, hf_dir = exported
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    got = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert torch.equal(got, greedy(ours, prompt, 10, EOS_ID))


NEW_TOKENS = 8


def ours_cached(model, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decoding of a left-padded batch through our forward_cached (prefill, then one token a
    step): (new tokens per row, step logits [steps, B, V])."""
    step = torch_step(model)
    ids_BS, mask_BT = left_pad(prompts, pad_id=EOS_ID)
    logits_BSV, past = step(ids_BS, mask_BT, None)
    tokens, logits = [], []
    for _ in range(NEW_TOKENS):
        logits.append(torch.from_numpy(logits_BSV[:, -1]))
        next_B = logits_BSV[:, -1].argmax(-1)
        tokens.append(next_B)
        mask_BT = np.concatenate([mask_BT, np.ones((len(prompts), 1), np.int64)], axis=1)
        logits_BSV, past = step(next_B[:, None].astype(np.int64), mask_BT, past)
    return np.stack(tokens, 1).tolist(), torch.stack(logits)


def hf_cached(model, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """The same through transformers' generate: left padding with an attention mask, its own KV cache
    (past_key_values) and position ids derived from the mask."""
    ids_BS, mask_BT = (torch.from_numpy(a) for a in left_pad(prompts, pad_id=EOS_ID))
    with torch.no_grad():
        out = model.generate(ids_BS, attention_mask=mask_BT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids_BS.shape[1]:].tolist(), torch.stack(out.logits)


def test_left_padded_batch_decodes_each_row_as_if_alone(exported):
    """[long prompt, short prompt] left-padded in one batch: every row generates the same greedy
    tokens, with the same step logits (1e-4), as its prompt alone, in transformers (the reference:
    its own attention mask handling and cache) and in our cached decoding; and the two agree."""
    from transformers import AutoModelForCausalLM

    ours, hf_dir = exported
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (13, 4)]  # 9 pads on row 1
    results = {}
    for name, run in (("transformers", lambda p: hf_cached(theirs, p)), ("ours", lambda p: ours_cached(ours, p))):
        batch_tokens, batch_logits = run(prompts)
        for b, prompt in enumerate(prompts):
            alone_tokens, alone_logits = run([prompt])
            assert batch_tokens[b] == alone_tokens[0], (name, b)
            torch.testing.assert_close(batch_logits[:, b], alone_logits[:, 0], atol=1e-4, rtol=0,
                                       msg=lambda m, name=name, b=b: f"{name}, row {b}: {m}")
        results[name] = batch_tokens, batch_logits
    assert results["ours"][0] == results["transformers"][0]
    torch.testing.assert_close(results["ours"][1], results["transformers"][1], atol=1e-4, rtol=0)
    assert len({tuple(t) for t in results["ours"][0]}) == 2  # the rows really differ


def test_tokenizer_round_trips_like_tokenizers(exported, tokenizer_file):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _, hf_dir = exported
    theirs = AutoTokenizer.from_pretrained(hf_dir)
    ours = Tokenizer.from_file(str(tokenizer_file))
    texts = ["def alpha_0(beta, alpha=None):\n    return alpha  # tabs\tand  spaces \n",
             "unicode: café ✓ 日本語 🙂", f"two docs{EOS}joined", " leading space", ""]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text).ids, text
        assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False) == text


def test_softmax_scoring_is_refused_and_nothing_written(tmp_path, tokenizer_file):
    make_model_dir(tmp_path / "model", tokenizer_file, score_func="softmax", n_group=1, topk_group=1)
    with pytest.raises(UserError, match="score_func") as e:
        export_hf(tmp_path / "model", tmp_path / "hf")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_write_keeps_the_previous_export(tmp_path, tokenizer_file, monkeypatch):
    make_model_dir(tmp_path / "model", tokenizer_file)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("previous")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export_hf_module, "save_file", boom)
    with pytest.raises(OSError):
        export_hf(tmp_path / "model", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model"]


def test_missing_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing"):
        export_hf(tmp_path / "nope", tmp_path / "hf")
