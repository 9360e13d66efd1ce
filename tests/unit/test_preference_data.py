"""Preference data on the real SmolLM2 tokenizer and chat template: records -> conversations -> token rows in the
layout of objectives/preference.py; truncation; KTO's mismatched pairs; bad records named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.data.preference import (IGNORE, PairCollate, PreferenceStats, UnpairedCollate, describe,
                                     encode_reply, holdout, read_pairs, read_unpaired, scoring_text, tokenize_pairs,
                                     tokenize_unpaired)
from lmforge.data.prompts import read_prompts
from lmforge.data.readers import DataError
from lmforge.objectives.preference import precompute_reference
from lmforge.tokenizer.chat import encode_chat, render


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    from lmforge.models.loading import load_tokenizer

    return load_tokenizer(smollm2_gguf)


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PAIR = {"prompt": "What does json.loads do?", "chosen": "Deserialize a JSON document to a Python object.",
        "rejected": "Return the square root of x."}


def _labelled(row_ids: torch.Tensor, row_labels: torch.Tensor) -> list[int]:
    """The tokens the labels score (labels are shifted: labels[t] is token t + 1)."""
    return [int(x) for x in row_labels if x != IGNORE]


def test_rows_are_the_chat_rendering_and_score_only_the_reply(tok, tmp_path):
    pairs = read_pairs(_write(tmp_path / "p.jsonl", [PAIR]))
    assert pairs[0].prompt == [{"role": "user", "content": PAIR["prompt"]}]
    assert pairs[0].chosen == [{"role": "assistant", "content": PAIR["chosen"]}]
    ex = tokenize_pairs(pairs, tok, 512)[0]
    # the prompt is exactly the template's prompt with the generation prompt
    assert ex.prompt == tok.backend.encode(render(tok, pairs[0].prompt, add_generation_prompt=True),
                                           add_special_tokens=False).ids
    batch = PairCollate(tok.pad_id)([ex])
    assert batch["input_ids"].shape[0] == 2 and set(batch) == {"input_ids", "labels", "attention_mask"}
    for row, reply in ((0, PAIR["chosen"]), (1, PAIR["rejected"])):
        convo = pairs[0].prompt + [{"role": "assistant", "content": reply}]
        enc = encode_chat(tok, convo, include_end_of_turn=True)
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :n].tolist()
        assert ids == enc.ids[:n]  # the rendering, up to and including the end-of-turn token
        assert tok.decode(ids[-1:], skip_special_tokens=False) == "<|im_end|>"
        scored = [t for t, m in zip(enc.ids, enc.assistant_mask) if m]
        assert _labelled(batch["input_ids"][row], batch["labels"][row]) == scored  # SFT's assistant mask
        assert tok.decode(scored, skip_special_tokens=True) == reply
        labels = batch["labels"][row]
        nz = (labels != IGNORE).nonzero().squeeze(1)
        assert torch.equal(labels[nz], batch["input_ids"][row, nz + 1])  # shifted: labels[t] = ids[t + 1]
        assert labels[n - 1:].eq(IGNORE).all() and batch["attention_mask"][row, n:].eq(0).all()


def test_message_lists_multi_turn_prompt_and_implicit_prompt(tok, tmp_path):
    convo = [{"role": "user", "content": "Name a sorting function."},
             {"role": "assistant", "content": "sorted"},
             {"role": "user", "content": "What does it return?"}]
    explicit = {"prompt": convo, "chosen": [{"role": "assistant", "content": "A new sorted list."}],
                "rejected": "None."}
    implicit = {"chosen": convo + [{"role": "assistant", "content": "A new sorted list."}],
                "rejected": convo + [{"role": "assistant", "content": "None."}]}
    stats = PreferenceStats()
    a, b = read_pairs(_write(tmp_path / "p.jsonl", [explicit, implicit]), system_prompt="Be brief.", stats=stats)
    assert a.prompt == b.prompt and a.prompt[0] == {"role": "system", "content": "Be brief."}
    assert a.chosen == b.chosen and a.rejected == b.rejected
    assert stats.formats == {"paired": 1, "paired (implicit prompt)": 1}
    ex = tokenize_pairs([a], tok, 512)[0]
    batch = PairCollate(tok.pad_id)([ex])
    scored = tok.decode(_labelled(batch["input_ids"][0], batch["labels"][0]), skip_special_tokens=True)
    assert scored == "A new sorted list."  # the earlier assistant turn ("sorted") is context, not scored


def test_truncation_cuts_the_prompt_from_the_left_then_the_reply(tok, tmp_path):
    long_prompt = "Context: " + " ".join(f"word{i}" for i in range(200)) + "\nWhat does json.loads do?"
    long_reply = "It " + " ".join(f"parses{i}" for i in range(200)) + "."
    recs = [dict(PAIR, prompt=long_prompt), dict(PAIR, prompt=long_prompt, chosen=long_reply)]
    pairs = read_pairs(_write(tmp_path / "p.jsonl", recs))
    stats = PreferenceStats()
    short, cut = tokenize_pairs(pairs, tok, 96, stats)
    assert stats.truncated_prompt == 2 and stats.truncated_reply == 1
    for ex in (short, cut):
        assert len(ex.prompt) + max(len(ex.chosen), len(ex.rejected)) <= 96
        assert tok.decode(ex.prompt[-3:], skip_special_tokens=False).endswith("assistant\n")  # the end is kept
    full = tokenize_pairs(pairs[:1], tok, 4096)[0]
    assert short.chosen == full.chosen and short.prompt == full.prompt[-len(short.prompt):]
    assert len(cut.prompt) == 48 and len(cut.chosen) == 48  # the prompt keeps half, the reply the rest
    assert tok.decode(cut.chosen[-1:], skip_special_tokens=False) != "<|im_end|>"  # a cut reply has no end
    closed = tokenize_pairs(pairs[1:], tok, 96, close_truncated=True)[0]  # reward models: keep the end token
    assert closed.chosen[:-1] == cut.chosen[:-1] and tok.decode(closed.chosen[-1:], skip_special_tokens=False) \
        == "<|im_end|>" and closed.chosen_mask[-1] == 1
    assert "prompts cut on the left" in describe(stats, "data")


def test_identical_pairs_are_skipped_and_counted(tok, tmp_path):
    stats = PreferenceStats()
    pairs = read_pairs(_write(tmp_path / "p.jsonl", [PAIR, dict(PAIR, rejected=PAIR["chosen"])]), stats=stats)
    assert len(pairs) == 1 and stats.identical == 1 and stats.first_identical.endswith("p.jsonl:2")
    assert "chosen identical to rejected" in describe(stats, "data")
    with pytest.raises(DataError, match="no usable preference pairs"):
        read_pairs(_write(tmp_path / "q.jsonl", [dict(PAIR, rejected=PAIR["chosen"])]))


def test_collate_margin_and_precomputed_reference(tok, tmp_path):
    recs = [dict(PAIR, margin=2.0), dict(PAIR, prompt="What does math.sqrt do?", chosen="Return the square root of x.",
                                         rejected="Deserialize a JSON document to a Python object.")]
    exs = tokenize_pairs(read_pairs(_write(tmp_path / "p.jsonl", recs)), tok, 512)
    batch = PairCollate(tok.pad_id)(exs)
    assert batch["input_ids"].shape[0] == 4 and batch["margin"].tolist() == [2.0, 0.0]
    assert torch.equal(batch["input_ids"][0, :len(exs[0].prompt)], batch["input_ids"][2, :len(exs[0].prompt)])
    exs[0].ref_chosen, exs[0].ref_rejected = -1.0, -2.0
    with pytest.raises(ValueError, match="precompute them for all"):
        PairCollate(tok.pad_id)(exs)
    exs[1].ref_chosen, exs[1].ref_rejected = -3.0, -4.0
    batch = PairCollate(tok.pad_id)(exs)
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -3.0] and batch["ref_rejected_logps"].tolist() == [-2.0, -4.0]


def test_kto_records_pairs_as_unpaired_and_fixed_mismatched_pairs(tok, tmp_path):
    recs = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0} for i in range(5)]
    recs.append(PAIR)  # a paired record gives a desirable and an undesirable example
    stats = PreferenceStats()
    records = read_unpaired(_write(tmp_path / "k.jsonl", recs), stats=stats)
    assert len(records) == 7 and stats.formats == {"unpaired": 5, "paired": 1}
    assert [r.label for r in records[-2:]] == [True, False]
    exs = tokenize_unpaired(records, tok, 512, seed=3)
    again = tokenize_unpaired(records, tok, 512, seed=3)
    assert [e.kl_completion for e in exs] == [e.kl_completion for e in again]  # fixed, so precomputable
    completions = [tuple(e.completion) for e in exs]
    for e in exs:
        assert e.kl_prompt == e.prompt and tuple(e.kl_completion) in completions
        assert e.kl_completion != e.completion  # another example's reply
    batch = UnpairedCollate(tok.pad_id)(exs[:3])
    assert batch["label"].dtype == torch.bool and batch["input_ids"].shape[0] == 3
    assert {"kl_input_ids", "kl_labels", "kl_attention_mask"} <= set(batch) and "ref_logps" not in batch


@pytest.fixture
def one_thread():
    """A tiny model is latency-bound: one thread avoids waiting on a second one when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_precomputed_reference_gives_the_on_the_fly_reference_loss(tok, tmp_path, tiny_llama_cfg, one_thread):
    """precompute_reference stores what the objective would compute with a frozen copy of the model."""
    import copy

    from lmforge.models import ModelConfig, Transformer
    from lmforge.objectives.preference import PreferenceObjective

    cfg = ModelConfig(**{**tiny_llama_cfg.__dict__, "vocab_size": tok.vocab_size, "max_position_embeddings": 256})
    model = Transformer(cfg)
    recs = [dict(PAIR, prompt=f"{PAIR['prompt']} ({i})") for i in range(3)]
    exs = tokenize_pairs(read_pairs(_write(tmp_path / "p.jsonl", recs)), tok, 512)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the policy moved away from the reference
    on_the_fly = PreferenceObjective("dpo", ref_model=ref)(model, PairCollate(tok.pad_id)(exs))
    precompute_reference(ref, exs, 2, tok.pad_id)
    batch = PairCollate(tok.pad_id)(exs)
    assert "ref_chosen_logps" in batch
    stored = PreferenceObjective("dpo")(model, batch)
    torch.testing.assert_close(stored[0], on_the_fly[0], atol=1e-5, rtol=1e-5)
    kto = tokenize_unpaired(read_unpaired(tmp_path / "p.jsonl"), tok, 512)
    precompute_reference(ref, kto, 4, tok.pad_id)
    batch = UnpairedCollate(tok.pad_id)(kto)
    torch.testing.assert_close(PreferenceObjective("kto")(model, batch)[0],
                               PreferenceObjective("kto", ref_model=ref)(model, {k: v for k, v in batch.items()
                                                                                if not k.startswith("ref_")})[0],
                               atol=1e-5, rtol=1e-5)


def test_scoring_text_is_what_the_reward_model_reads(tok, tmp_path):
    """serve's /v1/classify encodes the text and appends EOS: with scoring_text that is the reward row."""
    pairs = read_pairs(_write(tmp_path / "p.jsonl", [PAIR]))
    ex = tokenize_pairs(pairs, tok, 512, close_truncated=True)[0]
    text = scoring_text(tok, pairs[0].prompt, PAIR["chosen"])
    assert tok.backend.encode(text, add_special_tokens=False).ids + [tok.eos_id] == ex.prompt + ex.chosen
    prompt, reply, mask = encode_reply(tok, pairs[0].prompt, PAIR["chosen"])  # for scoring rollouts from ids
    assert prompt + reply == ex.prompt + ex.chosen and mask == ex.chosen_mask


def test_read_prompts_keeps_the_fields_reward_functions_read(tmp_path):
    path = _write(tmp_path / "rl.jsonl", [{"prompt": "2+2?", "answer": "4"},
                                          {"prompt": [{"role": "user", "content": "Write f."}], "tests": ["f()"]}])
    first, second = read_prompts(path, system_prompt="Think.")
    assert first["answer"] == "4" and first["prompt"] == "2+2?" and first["where"] == f"{path}:1"
    assert first["messages"] == [{"role": "system", "content": "Think."}, {"role": "user", "content": "2+2?"}]
    assert second["tests"] == ["f()"] and second["messages"][-1]["content"] == "Write f."
    with pytest.raises(DataError, match=r"rl2.jsonl:1: field 'where' is reserved"):
        read_prompts(_write(tmp_path / "rl2.jsonl", [{"prompt": "x", "where": "here"}]))


def test_holdout_keeps_a_prompt_on_one_side(tmp_path):
    recs = [dict(PAIR, prompt=f"Q{i // 3}", chosen=f"good {i}", rejected=f"bad {i}") for i in range(60)]
    train, val = holdout(read_pairs(_write(tmp_path / "p.jsonl", recs)), 0.3, seed=1)
    assert train and val and not {json.dumps(r.prompt) for r in train} & {json.dumps(r.prompt) for r in val}


@pytest.mark.parametrize("record, needle", [
    ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing 'prompt'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' is int"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "'rejected' is empty"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "'prompt' ends with an assistant message"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "'chosen' must start and end"),
    ({"prompt": "q", "chosen": [{"role": "wizard", "content": "a"}], "rejected": "b"}, "unknown role"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' is str"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
     "share no first message"),
    (["q", "a", "b"], "found a JSON list"),
])
def test_bad_paired_records_name_file_line_and_field(tmp_path, record, needle):
    path = _write(tmp_path / "bad.jsonl", [PAIR, record])
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert f"{path}:2" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("record, needle", [
    ({"prompt": "q", "completion": "a", "label": 1}, "'label' is int"),
    ({"prompt": "q", "completion": "a", "label": "true"}, "'label' is str"),
    ({"prompt": "q", "completion": "a"}, "missing 'label'"),
    ({"prompt": "q", "label": True}, "missing 'completion'"),
])
def test_bad_kto_records_name_file_line_and_field(tmp_path, record, needle):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a", "label": True}, record])
    with pytest.raises(DataError) as e:
        read_unpaired(path)
    assert f"{path}:2" in str(e.value) and needle in str(e.value)
