"""Real checkpoints against `transformers`: SmolLM2-135M (GGUF) and all-MiniLM-L6-v2 (BERT family)."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.tokenizer import encode_chat

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (dev extra)")

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model.eval(), tok


def test_smollm2_gguf_logits_match_transformers(smollm2, hf_smollm2):
    (ours, tok), (ref, _) = smollm2, hf_smollm2
    ids = torch.tensor([encode_chat(tok, CHAT, add_generation_prompt=True).ids])
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff}"


def test_smollm2_greedy_20_tokens_identical(smollm2, hf_smollm2):
    (ours, tok), (ref, _) = smollm2, hf_smollm2
    prompt = encode_chat(tok, [{"role": "user", "content": "Write a short poem about the sea."}],
                         add_generation_prompt=True).ids
    mine = _generate(ours, [prompt], SamplingParams(max_new_tokens=20))[0]
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert len(mine) == 20 and mine == theirs


def test_smollm2_concurrent_prompts_of_very_different_lengths_match_transformers(smollm2, hf_smollm2):
    (ours, tok), (ref, _) = smollm2, hf_smollm2
    import inspect

    import lmforge.inference.engine as engine_module

    long_text = inspect.getsource(engine_module)[:1500]  # ~350 tokens of real code
    prompts = [tok.encode("def add(a, b):"), tok.encode(long_text),
               encode_chat(tok, CHAT, add_generation_prompt=True).ids]
    mine = _generate(ours, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, got in zip(prompts, mine):
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        assert got == theirs


def test_smollm2_chat_rendering_matches_apply_chat_template(smollm2, hf_smollm2):
    (_, tok), (_, rtok) = smollm2, hf_smollm2
    conversations = [
        CHAT,
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2 and 3?"}],
    ]
    for conv in conversations:
        for gen in (False, True):
            enc = encode_chat(tok, conv, add_generation_prompt=gen)
            assert enc.text == rtok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert enc.ids == list(rtok.apply_chat_template(conv, add_generation_prompt=gen, return_dict=False))


def test_smollm2_tokenizer_matches_transformers_and_llama_cpp_digits(smollm2, hf_smollm2):
    (_, tok), (_, rtok) = smollm2, hf_smollm2
    text = "def parse(line):\n    return line.strip().split(',')  # café ünïcode"
    assert tok.encode(text) == rtok(text)["input_ids"]
    # SmolLM2's own tokenizer (and llama.cpp's 'smollm' pre-tokenizer) split numbers into single digits
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_smollm2_export_loads_in_transformers(smollm2, tmp_path):
    ours, tok = smollm2
    lmforge.save(ours, tok, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    rtok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = encode_chat(tok, CHAT, add_generation_prompt=True).ids
    assert list(rtok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(x).logits - ref(x).logits).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff}"
    again, tok2 = lmforge.load(tmp_path)
    assert tok2.chat_template == tok.chat_template and tok2.eos_token == tok.eos_token
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_minilm_hidden_states_match_transformers(minilm_dir):
    ours, tok = lmforge.load(minilm_dir)
    ref = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    rtok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    texts = ["The quick brown fox jumps over the lazy dog.", "lmforge loads MiniLM."]
    batch = rtok(texts, padding=True, return_tensors="pt")
    assert [tok.encode(t) for t in texts] == [rtok(t)["input_ids"] for t in texts]
    with torch.no_grad():
        out = ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"])
        theirs = ref(**batch)
    real = batch["attention_mask"].bool()
    diff = (out.hidden - theirs.last_hidden_state)[real].abs().max().item()
    assert diff <= 1e-4, f"max abs hidden diff {diff}"
    assert ours.cfg.family == "bert" and not ours.cfg.causal and ours.cfg.pooler



def test_minilm_span_head_exports_to_bert_for_question_answering(minilm_dir, tmp_path):
    """Real MiniLM with a (seeded) span head, saved by lmforge: transformers' BertForQuestionAnswering loads it
    without missing or unexpected weights and gives the same start / end logits on question + context pairs, and
    lmforge loads that model's own save_pretrained back with the same logits."""
    from lmforge.data.qa import QACollate, QAExample, qa_features

    torch.manual_seed(0)
    ours, tok = lmforge.load(minilm_dir, head="span")
    with torch.no_grad():
        ours.qa_outputs.weight.normal_(0, 0.5)  # far from the init, so a dropped head would show
    path = lmforge.save(ours, tok, tmp_path / "ours")
    ref, info = transformers.BertForQuestionAnswering.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    examples = [QAExample("a", "What does it return?", "dumps(obj)\n\nReturn a JSON formatted str.", [], "t"),
                QAExample("b", "Who wrote it?", "It was written by Ada in 1843.", [], "t")]
    batch = QACollate(tok.padding_id)(qa_features(examples, tok))
    batch.pop("start_positions"), batch.pop("end_positions")
    ref.save_pretrained(tmp_path / "theirs")
    back, _ = lmforge.load(tmp_path / "theirs")
    with torch.no_grad():
        theirs = ref.eval()(**batch)
        for model in (ours, back):
            z = model.eval()(**batch).logits  # (B, T, 2)
            real = batch["attention_mask"].bool()
            for i, t in enumerate((theirs.start_logits, theirs.end_logits)):
                diff = (z[..., i] - t)[real].abs().max().item()
                assert diff <= 1e-4, f"max abs {'end' if i else 'start'} logit diff {diff}"


def _generate(model, prompts, params):
    """New token ids per prompt through the engine (stop tokens included when hit), decoding natively."""
    engine = Engine(model)
    assert engine.decode_path == "native", engine.decode_path
    return [o.token_ids for o in engine.generate(prompts, params)]
