"""SFT data (formats, loss mask, truncation, packing, bad records) and the prompt-tuning / adapter transforms."""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.data.readers import DataError
from lmforge.data.sft import IGNORE, SFTCollate, load_sft, pack_examples, python_function_pairs, to_messages
from lmforge.models import ModelConfig, Transformer
from lmforge.objectives.causal_lm import CausalLM
from lmforge.tokenizer.base import Tokenizer


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    return lmforge.load_tokenizer(smollm2_gguf)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": "6, of course."}]},
    {"prompt": "Name a prime.", "response": "Seven is prime."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"prompt": [{"role": "user", "content": "What does `f` do?"}], "chosen": "It adds.",
     "rejected": [{"role": "assistant", "content": "It sorts."}]},
]


@pytest.mark.parametrize("template", ["smollm2", "default"])
def test_labels_cover_exactly_assistant_content_and_end_of_turn(smol_tok, tmp_path, template):
    tok = smol_tok if template == "smollm2" else Tokenizer(
        backend=smol_tok.backend, eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=None)
    examples, stats = load_sft(_write(tmp_path / "d.jsonl", RECORDS), tok, max_length=512)
    assert stats.formats == {"messages": 1, "prompt_response": 1, "alpaca": 1, "chosen": 1}
    answers = [["4", "6, of course."], ["Seven is prime."], ["chat"], ["It adds."]]  # a pair: its chosen reply
    for ex, expected in zip(examples, answers):
        assert len(ex.input_ids) == len(ex.labels)
        runs, cur = [], []
        for lab in ex.labels:  # contiguous runs of trained target tokens
            if lab != IGNORE:
                cur.append(lab)
            elif cur:
                runs.append(cur)
                cur = []
        runs += [cur] if cur else []
        assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [a + "<|im_end|>" for a in expected]
        # labels are the next input token wherever they are set
        for t in range(len(ex.labels) - 1):
            if ex.labels[t] != IGNORE:
                assert ex.labels[t] == ex.input_ids[t + 1]


def test_alpaca_input_and_system_prompt():
    msgs = to_messages({"instruction": "Sum.", "input": "1 2", "output": "3"}, "x:1", system_prompt="S")
    assert msgs == [{"role": "system", "content": "S"}, {"role": "user", "content": "Sum.\n\n1 2"},
                    {"role": "assistant", "content": "3"}]


@pytest.mark.parametrize("record, needle", [
    ({"text": "no sft fields"}, "expected an SFT record"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"prompt": "q", "response": 3}, "'response' is int"),
    ({"instruction": "", "output": "x"}, "'instruction' is empty"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' is int"),
])
def test_bad_records_name_file_and_line(smol_tok, tmp_path, record, needle):
    path = _write(tmp_path / "bad.jsonl", [RECORDS[1], record])
    with pytest.raises(DataError) as e:
        load_sft(path, smol_tok)
    assert needle in str(e.value) and f"{path}:2" in str(e.value)


def test_truncation_is_counted_and_keeps_targets(smol_tok, tmp_path):
    long = {"prompt": "word " * 10, "response": "answer " * 200}
    examples, stats = load_sft(_write(tmp_path / "d.jsonl", [long, RECORDS[1]]), smol_tok, max_length=64)
    assert stats.truncated == 1 and len(examples[0].input_ids) == 64
    # a prompt longer than max_length leaves no target: skipped and counted, not silently
    examples, stats = load_sft(_write(tmp_path / "e.jsonl", [{"prompt": "word " * 200, "response": "x"},
                                                             RECORDS[1]]), smol_tok, max_length=64)
    assert stats.no_target == 1 and stats.first_no_target.endswith(":1") and len(examples) == 1


def test_python_function_pairs_are_real_functions():
    pairs = list(python_function_pairs("{stdlib}/textwrap.py"))
    assert len(pairs) >= 3
    for where, rec in pairs:
        assert rec["prompt"].startswith("Write a Python function `")
        compile(rec["response"], where, "exec")  # the response is valid code on its own
        assert rec["response"].lstrip().startswith(("def ", "@", "async def"))


def _tiny(head="lm", **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64, max_position_embeddings=128, head=head, **kw)).eval()


def _examples(n, seed=0):
    from lmforge.data.sft import SFTExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(1, 96, (length,), generator=g).tolist()
        out.append(SFTExample(ids, [IGNORE] * (length // 2) + ids[length // 2:], f"x:{i}"))
    return out


def test_packed_rows_do_not_attend_across_examples():
    model = _tiny()
    examples = _examples(6)
    rows = pack_examples(examples, 24)
    assert sum(len(r) for r in rows) == 6 and all(sum(len(e.input_ids) for e in r) <= 24 for r in rows)
    batch = SFTCollate(0, packed=True)(rows)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    for i, row in enumerate(rows):
        at = 0
        for ex in row:
            alone = model(torch.tensor([ex.input_ids])).logits[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(logits[i, at:at + n], alone, atol=1e-5, rtol=1e-5)
            at += n
    # the packed loss equals the token-weighted loss of the padded batch
    padded = SFTCollate(0)(examples)
    obj = CausalLM()
    lp, mp = obj(model, batch)
    lu, mu = obj(model, padded)
    assert int(mp["tokens"]) == int(mu["tokens"])
    torch.testing.assert_close(lp, lu, atol=1e-5, rtol=1e-5)


def _train(model, steps=8, lr=1e-2, batch=None):
    batch = batch or SFTCollate(0)(_examples(8, seed=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss, _ = CausalLM()(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen_same = all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    return losses, changed, frozen_same


def test_prompt_tuning_trains_only_virtual_tokens_and_matches_manual_prepend(smol_tok):
    from lmforge.transforms.prompt_tuning import PromptConfig, apply_prompt_tuning

    model = _tiny()
    ids = torch.randint(1, 96, (2, 7))
    base_emb = model.embed.tokens(ids)
    base_full = model(inputs_embeds=torch.cat([model.embed.tokens(torch.tensor([[5, 6, 7, 5]])).expand(2, -1, -1),
                                               base_emb], 1)).logits
    apply_prompt_tuning(model, PromptConfig(num_virtual_tokens=4, init_text=None))
    with torch.no_grad():
        model.prompt.embedding.copy_(model.embed.tokens.weight[[5, 6, 7, 5]])
    out = model(ids).logits
    assert out.shape == (2, 7, 96)
    torch.testing.assert_close(out, base_full[:, 4:])  # virtual tokens act as a prepended prompt
    losses, changed, frozen_same = _train(model)
    assert changed == {"prompt.embedding"} and frozen_same and losses[-1] < losses[0]


def test_prompt_tuning_with_cache_and_padding_matches_full_forward():
    from lmforge.models.transformer import DenseKVCache
    from lmforge.transforms.prompt_tuning import PromptConfig, apply_prompt_tuning

    model = apply_prompt_tuning(_tiny(), PromptConfig(num_virtual_tokens=3, init_text=None))
    ids = torch.randint(1, 96, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    full = model(ids, attention_mask=mask).logits
    cache = DenseKVCache(model.cfg, 2, 16)
    first = model(ids[:, :4], attention_mask=mask[:, :4], cache=cache).logits
    rest = [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits for t in (4, 5)]
    torch.testing.assert_close(torch.cat([first] + rest, 1)[:, 2:], full[:, 2:], atol=1e-5, rtol=1e-5)


def test_prompt_saved_in_peft_layout_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.models.hf import config_from_hf, state_dict_from_hf
    from lmforge.models.loading import instantiate
    from lmforge.transforms.peft import load_prompt, save_prompt
    from lmforge.transforms.prompt_tuning import PromptConfig, apply_prompt_tuning

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)).eval()
    cfg = config_from_hf(hf.config.to_dict())
    ours = instantiate(cfg, state_dict_from_hf(hf.state_dict(), cfg)[0]).eval()
    apply_prompt_tuning(ours, PromptConfig(num_virtual_tokens=5, init_text=None))
    save_prompt(ours, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "p").eval()
    ids = torch.randint(1, 96, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits[:, 5:], atol=1e-4,
                                   rtol=1e-4)  # peft returns the virtual positions too
    again = load_prompt(instantiate(cfg, state_dict_from_hf(hf.state_dict(), cfg)[0]).eval(), tmp_path / "p")
    torch.testing.assert_close(again(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_adapters_start_as_identity_train_alone_and_reload(tmp_path, kind):
    from lmforge.transforms.adapters import AdapterConfig, apply_adapters
    from lmforge.transforms.peft import load_adapters, save_adapters

    extra = dict(causal=False, norm="layernorm", norm_position="post", position="learned", mlp="plain",
                 activation="gelu", family="bert") if kind == "bert" else {}
    model = _tiny(**extra)
    ids = torch.randint(1, 96, (2, 9))
    base = model(ids).logits
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapters(model, AdapterConfig(bottleneck=8))
    assert torch.equal(model(ids).logits, base)  # up-projection starts at zero
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_sd.items())  # base names unchanged
    if kind == "llama":
        losses, changed, frozen_same = _train(model, steps=20, lr=1e-3)
        assert losses[-1] < losses[0] and frozen_same
        assert changed and all(".adapter_" in n for n in changed)
    save_adapters(model, tmp_path / "a", AdapterConfig(bottleneck=8))
    fresh = _tiny(**extra)
    load_adapters(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(ids).logits, model.eval()(ids).logits)


def test_freeze_trains_top_blocks_and_head_only():
    from lmforge.transforms.freeze import train_top_blocks

    model = train_top_blocks(_tiny(tie_embeddings=False), 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "norm.", "lm_head.")) for n in trainable)
    assert "lm_head.weight" in trainable
    losses, changed, frozen_same = _train(model)
    assert frozen_same and changed == trainable and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="train_top must be between 0 and 2"):
        train_top_blocks(_tiny(), 3)
