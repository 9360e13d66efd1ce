"""Curation: perplexity scoring (bits per byte under a language model, a threshold Filter and CCNet's corpus-wide
head / middle / tail buckets) and decontamination (documents sharing a word 13-gram with an evaluation set), on
real text: standard-library docstrings and source, HumanEval's problems, the built-in stdlib evaluation items."""

from __future__ import annotations

import ast
import base64
import json
import math
import random
import string
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.curate.base import CorpusStep, Doc, Filter
from lmforge.curate.decontaminate import Decontaminate, DecontaminationConfig, record_texts, task_items
from lmforge.curate.perplexity import (Perplexity, PerplexityBuckets, PerplexityBucketsConfig, PerplexityConfig,
                                       Scorer)
from lmforge.data.code_problems import load_problems
from lmforge.data.ngrams import normalized_words
from lmforge.data.stdlib import DOCTEST_MODULES, STDLIB_MC_MODULES, stdlib_doctest_items

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EVAL_MODULES = {m.split(".")[0] for m in STDLIB_MC_MODULES + DOCTEST_MODULES} | {"posixpath", "ntpath",
                                                                                   "genericpath", "decimal"}


def _docstrings(n: int, min_chars: int = 200, skip: set[str] = frozenset()) -> list[str]:
    """`n` docstrings (>= min_chars, no doctest) of public functions and classes of top-level stdlib modules."""
    out = []
    for f in sorted(STDLIB.glob("*.py")):
        if f.stem in skip:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and ">>>" not in doc:
                    out.append(doc)
    random.Random(0).shuffle(out)
    return out[:n]


def _junk(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, text) of `n` injected bad documents: random letters, keyboard mash, base64 and hex blobs, word salad
    and letter-scrambled words (made of real docstring words), mojibake, shop-link boilerplate with tracking codes,
    CJK / Cyrillic noise."""
    rnd = random.Random(seed)
    words = " ".join(_docstrings(300)).split()

    def letters():
        return " ".join("".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(2, 9))) for _ in range(60))

    def mash():
        return "".join(rnd.choices(string.ascii_letters + string.digits + string.punctuation + " ", k=400))

    def b64():
        return base64.b64encode(rnd.randbytes(300)).decode()

    def hexdump():
        return " ".join(rnd.randbytes(2).hex() for _ in range(100))

    def salad():
        return " ".join(rnd.choices(words, k=70))

    def scrambled():
        return " ".join("".join(rnd.sample(w, len(w))) for w in rnd.sample(words, 70))

    def mojibake():
        return " ".join(rnd.sample(words, 60)).encode("utf-8").decode("cp1252", "replace").encode().decode("latin-1")

    def boilerplate():
        return " | ".join(f"{rnd.choice(['Buy', 'Shop', 'Deal', 'Sale', 'Cart'])} "
                          f"{rnd.choice(['SKU', 'REF', 'ID', 'utm'])}-{rnd.randbytes(4).hex()}" for _ in range(25))

    def noise():
        return "".join(chr(rnd.randint(0x4E00, 0x9FFF)) if rnd.random() < .5 else chr(rnd.randint(0x400, 0x4FF))
                       for _ in range(150))

    kinds = [letters, mash, b64, hexdump, salad, scrambled, mojibake, boilerplate, noise]
    return [(k.__name__, k()) for k in (kinds * n)[:n]]


def _docs(texts: list[str]) -> list[Doc]:
    return [Doc(f"doc:{i}", t, f"doc:{i}") for i, t in enumerate(texts)]


# ----------------------------------------------------------------------------- perplexity: a tiny model, exactly

@pytest.fixture(scope="module")
def tiny_lm(gpt2_tokenizer, tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the real GPT-2 BPE, saved as a Hugging Face folder."""
    import lmforge
    from lmforge.models import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=gpt2_tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=256, initializer_range=0.2)
    return lmforge.save(Transformer(cfg), gpt2_tokenizer, tmp_path_factory.mktemp("tiny") / "lm")


def _reference_bpb(model, tok, text: str, max_tokens: int) -> float:
    """Bits per byte by hand: the full logits of [BOS] + the first max_tokens tokens, one document at a time."""
    enc = tok.backend.encode(text, add_special_tokens=False)
    ids = enc.ids[:max_tokens]
    covered = text if len(enc.ids) <= max_tokens else text[:enc.offsets[max_tokens - 1][1]]
    x = torch.tensor([[tok.bos_id] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)  # (T, V)
    nll = -logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    return nll / (math.log(2) * len(covered.encode("utf-8")))


def test_bits_per_byte_is_sum_nll_over_ln2_bytes_in_any_batch(tiny_lm):
    import lmforge

    texts = _docstrings(7) + ["Ünïcode prose — “quoted”, café; naïve façade. " * 3, "x"]
    model, tok = lmforge.load(tiny_lm)
    want = [_reference_bpb(model, tok, t, 48) for t in texts]
    for batch in (1, 3, 16):  # right padding never changes a document's score
        got = Scorer(PerplexityConfig(model=str(tiny_lm), max_tokens=48, batch_size=batch))(texts)
        assert got.dtype == np.float64 and got == pytest.approx(want, rel=1e-4), batch
    assert Scorer(PerplexityConfig(model=str(tiny_lm)))([""]).tolist() == [0.0]  # no bytes: no bits


def test_max_tokens_scores_the_beginning_and_counts_its_bytes(tiny_lm, gpt2_tokenizer):
    scorer = Scorer(PerplexityConfig(model=str(tiny_lm), max_tokens=20))
    text = _docstrings(1, min_chars=600)[0]
    ids, n_bytes = scorer._prefix(text)
    assert ids == gpt2_tokenizer.encode(text, add_special_tokens=False)[:20]
    assert n_bytes == len(gpt2_tokenizer.decode(ids).encode("utf-8")) < len(text.encode("utf-8"))
    head = gpt2_tokenizer.decode(ids)  # the scored beginning alone scores the same
    assert scorer([text]) == pytest.approx(scorer([head]), rel=1e-5)
    assert scorer([text]) != pytest.approx(Scorer(PerplexityConfig(model=str(tiny_lm), max_tokens=200))([text]))
    assert Scorer(PerplexityConfig(model=str(tiny_lm), max_tokens=10**6)).max_tokens == 255  # the model's context


def test_threshold_filter_removes_above_and_annotates_every_document(tiny_lm, gpt2_tokenizer):
    texts = _docstrings(6)
    scores = Scorer(PerplexityConfig(model=str(tiny_lm)))(texts)
    limit = float(np.median(scores))
    step = Perplexity(PerplexityConfig(model=str(tiny_lm), max_bits_per_byte=limit))
    assert isinstance(step, Filter) and step.name == "perplexity"
    docs = _docs(texts)
    verdicts = step(docs)
    assert verdicts == [("perplexity:max_bits_per_byte" if s > limit else None) for s in scores]
    assert verdicts.count(None) == 3
    lengths = [len(gpt2_tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert max(lengths) < 512  # every document scored whole
    assert step.extra() == {"tokens_scored": sum(lengths), "bytes_scored": sum(len(t.encode()) for t in texts)}
    assert [d.meta["bits_per_byte"] for d in docs] == pytest.approx(scores.tolist())
    assert Perplexity(PerplexityConfig(model=str(tiny_lm)))(_docs(texts)) == [None] * 6  # no threshold: score only


def test_buckets_cut_at_corpus_quantiles(tiny_lm):
    step = PerplexityBuckets(PerplexityBucketsConfig(model=str(tiny_lm)))
    assert isinstance(step, CorpusStep) and step.name == "perplexity_buckets"
    docs = _docs(_docstrings(9))
    keys = np.concatenate([step.keys(docs[:4]), step.keys(docs[4:])])  # two partitions
    assert keys.dtype == np.uint64 and keys.shape == (9, 2)
    scores = np.array([d.meta["bits_per_byte"] for d in docs])
    assert keys[:, 0].view(np.float64).tolist() == scores.tolist()  # the float64 bits, exactly
    removed = step.duplicates([d.key for d in docs], keys)
    rank = np.argsort(np.argsort(scores))  # 0 = lowest bits per byte; tertiles of 9: ranks 0-2 head, 6-8 tail
    assert removed == {d.key: ("perplexity_buckets:tail", "") for d, r in zip(docs, rank) if r >= 6}


def test_buckets_rules_on_known_scores():
    """The cut on given scores (no model is loaded by `duplicates`): quantiles, kept buckets, threshold, groups."""
    scores = np.array([0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 5.0])
    keys = np.stack([scores.view(np.uint64), np.zeros(12, np.uint64)], 1)
    names = [f"d{i}" for i in range(12)]

    def cut(**kw) -> dict[str, str]:
        dups = PerplexityBuckets(PerplexityBucketsConfig(model="unused", **kw)).duplicates(names, keys)
        return {k: r for k, (r, _) in dups.items()}

    assert cut() == {f"d{i}": "perplexity_buckets:tail" for i in range(8, 12)}
    assert cut(buckets=["head"]) == {**{f"d{i}": "perplexity_buckets:middle" for i in range(4, 8)},
                                     **{f"d{i}": "perplexity_buckets:tail" for i in range(8, 12)}}
    everything = cut(buckets=["head", "middle", "tail"], max_bits_per_byte=2.0)
    assert everything == {"d11": "perplexity_buckets:max_bits_per_byte"}
    assert cut(cut_points=[0.5, 0.9]) == {"d11": "perplexity_buckets:tail", "d10": "perplexity_buckets:tail"}
    keys[6:, 1] = 7  # two groups (e.g. two languages) of 6: each cut on its own tertiles
    assert cut() == {f"d{i}": "perplexity_buckets:tail" for i in (4, 5, 10, 11)}


def test_perplexity_config_errors(tiny_lm):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, found 'fp8'"):
        PerplexityConfig(dtype="fp8").validate()
    with pytest.raises(ValueError, match="max_bits_per_byte must be > 0"):
        PerplexityConfig(max_bits_per_byte=0).validate()
    with pytest.raises(ValueError, match=r"buckets must be distinct names of head, middle, tail, found \['top'\]"):
        PerplexityBucketsConfig(buckets=["top"]).validate()
    with pytest.raises(ValueError, match=r"cut_points must be two quantiles .* found \[0.7, 0.3\]"):
        PerplexityBucketsConfig(cut_points=[0.7, 0.3]).validate()
    with pytest.raises(ValueError, match="max_tokens and batch_size must be >= 1"):
        Perplexity(PerplexityConfig(model=str(tiny_lm), batch_size=0))


# ----------------------------------------------------------------------------- perplexity: the target

@pytest.mark.slow
def test_smollm2_removes_junk_and_keeps_stdlib_prose(smollm2_gguf):
    """SmolLM2-135M (the offline GGUF) scores 60 real docstrings and 27 injected bad documents; the threshold
    keeps >= 95% of the prose and removes >= 90% of the junk (measured: all prose under 2.0, all junk over 2.2)."""
    prose, junk = _docstrings(60), _junk(27)
    step = Perplexity(PerplexityConfig(model="smollm2-135m-instruct", max_tokens=128, max_bits_per_byte=2.1))
    docs = _docs(prose + [t for _, t in junk])
    verdicts = step(docs)
    kept_prose = sum(v is None for v in verdicts[:60]) / 60
    removed_junk = sum(v is not None for v in verdicts[60:]) / 27
    scores = [d.meta["bits_per_byte"] for d in docs]
    print(f"prose kept {kept_prose:.1%} (median {np.median(scores[:60]):.2f}, max {max(scores[:60]):.2f} bits/byte);"
          f" junk removed {removed_junk:.1%} (min {min(scores[60:]):.2f})")
    assert kept_prose >= 0.95 and removed_junk >= 0.90
    # the same corpus (31% junk) through CCNet's tertiles, keeping head and middle: the junk is the tail
    buckets = PerplexityBuckets(PerplexityBucketsConfig(model=str(smollm2_gguf), max_tokens=128))
    keys = buckets.keys(_docs(prose + [t for _, t in junk]))
    assert keys[:, 0].view(np.float64) == pytest.approx(scores, rel=1e-4)
    tail = buckets.duplicates([d.key for d in docs], keys)
    assert set(tail.values()) == {("perplexity_buckets:tail", "")}
    tail_prose, tail_junk = sum(d.key in tail for d in docs[:60]), sum(d.key in tail for d in docs[60:])
    print(f"tertiles: tail holds {tail_junk}/27 junk, {tail_prose}/60 prose")
    assert tail_junk / 27 >= 0.90 and 1 - tail_prose / 60 >= 0.95


# ----------------------------------------------------------------------------- decontamination

@pytest.fixture(scope="module")
def decon() -> Decontaminate:
    return Decontaminate(DecontaminationConfig(tasks=["stdlib-mc", "stdlib-doctest", "humaneval"]))


def test_humaneval_prompt_in_a_document_is_removed_and_named(decon):
    problem = load_problems()[12]
    prose = _docstrings(2, skip=EVAL_MODULES)
    docs = _docs([prose[0] + "\n\nHere is a nice exercise from a blog:\n\n" + problem["prompt"] + "\n" + prose[1],
                  prose[0], prose[1]])
    assert isinstance(decon, Filter) and decon.name == "decontaminate"
    assert decon(docs) == ["decontaminate:humaneval", None, None]
    found = docs[0].meta["decontaminate"]
    assert found["task"] == "humaneval" and found["tasks"] == ["humaneval"] and found["item"] == problem["task_id"]
    assert found["ngram"] in " ".join(normalized_words(problem["prompt"]))
    assert decon.extra() == {"hash_collisions": 0, "matched:humaneval": 1}


def test_stdlib_doctest_transcript_and_source_file_are_removed(decon):
    item = max((r for r in stdlib_doctest_items() if r["source"].startswith("stdlib:fractions.")),
               key=lambda r: len(r["prompt"]))
    transcript = item["prompt"].split("\n", 1)[1] + item["target"] + "\n"  # as a tutorial would show it
    docs = _docs([f"A quick look at exact arithmetic in Python:\n\n{transcript}\nNeat, isn't it?",
                  (STDLIB / "fractions.py").read_text(encoding="utf-8")])
    assert len(transcript.split()) >= 13
    assert decon(docs) == ["decontaminate:stdlib-doctest", "decontaminate:stdlib-doctest"]
    assert docs[1].meta["decontaminate"]["item"].startswith("stdlib:fractions.")


def test_ordinary_stdlib_prose_and_source_are_kept(decon):
    prose = _docstrings(400, min_chars=100, skip=EVAL_MODULES)
    sources = [f.read_text(encoding="utf-8") for f in sorted(STDLIB.glob("*.py"))
               if f.stem not in EVAL_MODULES and not f.stem.startswith("_") and f.stat().st_size < 60_000][:80]
    docs = _docs(prose + sources)
    verdicts = decon(docs)
    assert len(prose) == 400 and len(sources) == 80
    assert verdicts == [None] * len(docs), [d.meta.get("decontaminate") for d in docs if "decontaminate" in d.meta]
    assert decon.extra() == {"hash_collisions": 0}


def test_all_number_ngrams_do_not_count():
    """HumanEval/129's grid holds "2 3 4 … 14": without skip_numeric, doctest.py (a counting sequence) matches."""
    docs = _docs([(STDLIB / "doctest.py").read_text(encoding="utf-8")])
    assert Decontaminate(DecontaminationConfig(tasks=["humaneval"]))(docs) == [None]
    strict = Decontaminate(DecontaminationConfig(tasks=["humaneval"], skip_numeric=False))
    assert strict(docs) == ["decontaminate:humaneval"]
    assert docs[0].meta["decontaminate"]["ngram"] == "2 3 4 5 6 7 8 9 10 11 12 13 14"


def test_file_tasks_mc_and_gen_records(tmp_path):
    prose = _docstrings(40, min_chars=300, skip=EVAL_MODULES)
    mc = tmp_path / "arc.jsonl"
    mc.write_text(json.dumps({"question": "Which statement describes the function best?",
                              "choices": {"text": ["It sorts.", prose[0]], "label": ["A", "B"]},
                              "answerKey": "B"}) + "\n", encoding="utf-8")
    gen = tmp_path / "qa.jsonl"
    gen.write_text(json.dumps({"prompt": prose[1][:80], "target": prose[1][80:]}) + "\n", encoding="utf-8")
    step = Decontaminate(DecontaminationConfig(tasks=[f"mc:{mc}", f"gen:{gen}"], n=8))
    docs = _docs([f"Notes.\n{prose[0]}", prose[1].upper(), prose[-1]])
    assert step(docs) == [f"decontaminate:mc:{mc}", f"decontaminate:gen:{gen}", None]
    assert docs[0].meta["decontaminate"]["item"] == f"{mc}:1"
    assert record_texts({"ctx_a": "a b", "ctx_b": "c", "endings": ["x", "y"], "label": 0}) == ["a b c x", "a b c y"]
    assert record_texts({"question": "q", "A": "1", "B": "2", "answer": "B"}) == ["q 1", "q 2", "q B"]
    assert record_texts({"question": "How many?", "answer": "Two.\n#### 2"}) == ["How many? Two.\n#### 2"]


def test_task_items_match_the_evaluation_and_the_contamination_check():
    """The n-gram code is one copy: eval/contamination imports it from data/ngrams."""
    from lmforge.data import ngrams
    from lmforge.eval import contamination

    assert contamination.normalized_words is ngrams.normalized_words and contamination.NGRAM == ngrams.NGRAM == 13
    humaneval = dict(task_items("humaneval"))
    assert len(humaneval) == 164 and humaneval["HumanEval/0"][0].startswith(load_problems()[0]["prompt"])
    assert {len(t) for _, t in task_items("stdlib-mc")} == {4}  # question + each of its 4 choices


def test_held_out_modules_and_doc_questions_are_removed_with_what_shares_their_text():
    """stdlib-ppl's held-out modules leave the corpus (and so does a file sharing a 13-gram with one); a stdlib-doc
    answer long enough to hold a 13-gram takes the file holding the asked function's docstring with it."""
    from lmforge.data.stdlib import stdlib_heldout_texts

    held = dict(stdlib_heldout_texts(n=10**6))
    name, text = sorted(held.items())[0]
    shared = "\n".join(text.splitlines()[40:60])  # 20 lines of a held-out module inside another file
    other = next(p for p in sorted(STDLIB.glob("*.py")) if p.name not in held and p.stat().st_size > 5000)
    docs = _docs([text, f"# notes\n{shared}\n", other.read_text(encoding="utf-8")])
    assert Decontaminate(DecontaminationConfig(tasks=["stdlib-ppl"]))(docs) == ["decontaminate:stdlib-ppl"] * 2 + [
        None]
    assert docs[0].meta["decontaminate"]["item"] == f"stdlib:{name}"
    items = dict(task_items("stdlib-doc"))
    assert items["stdlib:shutil.rmtree"] == ["What does `shutil.rmtree` do? Recursively delete a directory tree."]
    # a summary of 13 words or more is found in its module's source (shorter ones have no 13-gram of their own)
    assert any(k.startswith("stdlib:zipfile.") and len(v[0].split()) > 25 for k, v in items.items())
    docs = _docs([(STDLIB / "zipfile.py").read_text(encoding="utf-8"), (STDLIB / "shutil.py").read_text()])
    assert Decontaminate(DecontaminationConfig(tasks=["stdlib-doc"]))(docs) == ["decontaminate:stdlib-doc", None]
    assert docs[0].meta["decontaminate"]["item"].startswith("stdlib:zipfile.")


def test_decontamination_config_errors():
    with pytest.raises(ValueError, match="unknown task 'hellaswag'; expected one of stdlib-mc, stdlib-doctest, "
                                         "stdlib-ppl, stdlib-doc, humaneval, mc:PATH or gen:PATH"):
        DecontaminationConfig(tasks=["hellaswag"]).validate()
    with pytest.raises(ValueError, match="each task at most once"):
        DecontaminationConfig(tasks=["humaneval", "humaneval"]).validate()
    with pytest.raises(ValueError, match="n must be a positive integer, found 0"):
        Decontaminate(DecontaminationConfig(n=0))
    with pytest.raises(ValueError, match="unknown task 'mc:'"):
        DecontaminationConfig(tasks=["mc:"]).validate()
