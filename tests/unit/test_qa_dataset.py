"""The extractive-QA set built from the standard library's docstrings (data/qa_data.py): every answer is its span of
the context, modules never straddle splits, the build is deterministic, every kind of question is there, questions
do not give their answers away, spot values agree with the live objects, and `{qa}` builds the files on first use."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.qa_data import (BUILDER_VERSION, KINDS, documented_functions, ensure_qa_data, function_questions,
                                  qa_records)
from lmforge.data.readers import expand_placeholders


@pytest.fixture(scope="module")
def splits():
    return qa_records()


@pytest.fixture(scope="module")
def records(splits):
    return [r for rs in splits.values() for r in rs]


@pytest.fixture(scope="module")
def functions():
    return {f["qualname"]: f for f in documented_functions()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`{qa}/train.jsonl` expanded with LMFORGE_CACHE in a fresh folder: builds the set there on first use."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE", str(cache))
        path = Path(expand_placeholders("{qa}/train.jsonl"))
    return cache, path


def live(qualname: str):
    """The live object of a stdlib qualname (module.Class.name), importing the longest module prefix."""
    parts = qualname.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise LookupError(qualname)


def questions_of(functions, qualname: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in function_questions(functions[qualname], per_function=10):
        out.setdefault(r["kind"], []).append(r)
    return out


def test_every_answer_is_its_span_of_the_context(records):
    assert records
    for r in records:
        assert set(r) == {"id", "title", "context", "question", "answers", "kind", "module"}, r["id"]
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert text.strip() == text and text, r["id"]
        assert r["context"][start:start + len(text)] == text, r["id"]
        assert r["context"].startswith(r["title"] + "("), r["id"]
        assert r["title"].startswith(r["module"] + "."), r["id"]
    assert len({r["id"] for r in records}) == len(records)


def test_no_module_in_two_splits_and_sizes(splits):
    modules = {s: {r["module"] for r in rs} for s, rs in splits.items()}
    assert set(modules) == {"train", "validation", "test"}
    assert not modules["train"] & modules["validation"]
    assert not modules["train"] & modules["test"]
    assert not modules["validation"] & modules["test"]
    assert len(splits["train"]) >= 2000
    assert len(splits["validation"]) >= 150 and len(splits["test"]) >= 150
    assert len(modules["train"]) > 4 * max(len(modules["validation"]), len(modules["test"]))


def test_deterministic_and_seeded(splits, functions):
    assert qa_records() == splits  # a second build from the source files
    other = qa_records(seed=1, functions=list(functions.values()))
    assert {r["module"] for r in other["test"]} != {r["module"] for r in splits["test"]}


def test_every_kind_present_with_a_minimum_count(records):
    counts = Counter(r["kind"] for r in records)
    assert set(counts) == set(KINDS)
    minimum = {"does": 1000, "default": 400, "returns": 300, "raises": 40, "param": 30}
    for kind, n in minimum.items():
        assert counts[kind] >= n, (kind, counts)


def test_caps_per_function_and_module(records):
    assert max(Counter(r["title"] for r in records).values()) <= 4
    assert max(Counter(r["module"] for r in records).values()) <= 60


def test_question_never_contains_the_answer(records):
    for r in records:
        assert r["answers"]["text"][0].lower() not in r["question"].lower(), r["id"]


def test_defaults_agree_with_the_live_signatures(records):
    """Every `default` question of a few pure-Python modules: the answer sits right after "name=" in the signature
    line and, when a literal, equals the live default."""
    checked = 0
    for r in records:
        if r["kind"] != "default" or r["module"] not in {"json", "textwrap", "shutil", "base64", "difflib",
                                                          "statistics", "calendar", "glob", "fnmatch", "string"}:
            continue
        name = re.fullmatch(r"What is the default value of `(\w+)` in `[\w.]+`\?", r["question"]).group(1)
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        signature = r["context"].split("\n", 1)[0]
        assert start < len(signature) and signature[:start].endswith("=")
        assert re.search(rf"[(, ]{name}(: [^=]+)?=$", signature[:start]), r["id"]
        try:
            literal = ast.literal_eval(text)
        except ValueError:
            continue  # a name (`_spacing`, `ALL_COMPLETED`): its live value is another text
        assert inspect.signature(live(r["title"])).parameters[name].default == literal, r["id"]
        checked += 1
    assert checked >= 20


def test_spot_checks_json_dumps(functions):
    got = questions_of(functions, "json.dumps")
    doc = inspect.getdoc(__import__("json").dumps)
    assert got["does"][0]["answers"]["text"] == [doc.split(".")[0]]  # "Serialize ``obj`` to a JSON formatted ``str``"
    assert got["default"]
    defaults = inspect.signature(__import__("json").dumps).parameters
    for r in got["default"]:
        name = re.search(r"`(\w+)`", r["question"]).group(1)
        assert r["answers"]["text"] == [repr(defaults[name].default)]
    context = got["does"][0]["context"]
    assert "indent=None" in context.split("\n")[0]  # the brief's example: the span after "indent=" is "None"


def test_spot_checks_returns_raises_param(functions):
    median = questions_of(functions, "statistics.median")
    summary = inspect.getdoc(live("statistics.median")).split(".")[0]  # "Return the median (middle value) of ..."
    assert median["does"][0]["answers"]["text"] == [summary]
    assert median["returns"][0]["answers"]["text"] == [summary.removeprefix("Return ")]
    assert median["returns"][0]["question"] == "What does `statistics.median` return?"

    doc = inspect.getdoc(live("xml.etree.ElementTree.register_namespace"))
    assert "ValueError is raised if prefix is reserved or is invalid." in doc
    raises = questions_of(functions, "xml.etree.ElementTree.register_namespace")["raises"]
    assert [(r["question"], r["answers"]["text"][0]) for r in raises] == [
        ("What exception does `xml.etree.ElementTree.register_namespace` raise if prefix is reserved or is invalid?",
         "ValueError")]

    unpack = questions_of(functions, "shutil.unpack_archive")["raises"]  # "In case none is found, a ValueError ..."
    assert "In case none is found, a ValueError is raised." in inspect.getdoc(live("shutil.unpack_archive"))
    assert ("What exception does `shutil.unpack_archive` raise in case none is found?", "ValueError") in \
        [(r["question"], r["answers"]["text"][0]) for r in unpack]

    assert "f1 -- First file name\n" in inspect.getdoc(live("filecmp.cmp"))
    params = {r["question"]: r["answers"]["text"][0] for r in questions_of(functions, "filecmp.cmp")["param"]}
    assert params.get("What is `f1` in `filecmp.cmp`?", "First file name") == "First file name"
    assert params and all(q.startswith("What is `") for q in params)

    fields = questions_of(functions, "importlib.metadata.version")  # ":param distribution_name: ... :return: ..."
    assert fields["param"][0]["answers"]["text"] == ["The name of the distribution package to query"]
    assert fields["returns"][0]["answers"]["text"][0].startswith("The version string for the package")


def test_negated_and_unrelated_exceptions_are_not_questions(functions):
    """"This does not raise TimeoutError!" (asyncio.wait) is no answer to "What exception does it raise?"."""
    for r in function_questions(functions["asyncio.tasks.wait"], per_function=10):
        assert r["kind"] != "raises" or r["answers"]["text"] != ["TimeoutError"]


def test_placeholder_builds_the_files_once(built, records):
    cache, path = built
    assert path == cache / "qa" / "train.jsonl" and path.exists()
    manifest = json.loads((cache / "qa" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["inputs"]["builder_version"] == BUILDER_VERSION
    total = 0
    for split in ("train", "validation", "test"):
        lines = (cache / "qa" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == manifest["files"][f"{split}.jsonl"]["records"] == manifest["counts"][split]["records"]
        assert sum(manifest["counts"][split][k] for k in KINDS) == len(lines)
        total += len(lines)
    assert total == len(records)
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0]) in records
    readme = (cache / "qa" / "README.md").read_text(encoding="utf-8")
    assert all(f"- `{k}`:" in readme for k in KINDS)
    before = path.stat().st_mtime_ns
    assert ensure_qa_data(cache / "qa") == cache / "qa" and path.stat().st_mtime_ns == before  # fresh: kept


def test_stale_folder_is_rebuilt(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"inputs": {"builder_version": -1}, "files": {}}))
    said = []
    ensure_qa_data(folder, progress=said.append)
    assert said and (folder / "validation.jsonl").exists()
    assert json.loads((folder / "manifest.json").read_text())["inputs"]["builder_version"] == BUILDER_VERSION


def test_read_qa_reads_the_files(built, records):
    from lmforge.data.qa import read_qa

    folder = built[0] / "qa"
    examples, stats = read_qa([folder / f"{s}.jsonl" for s in ("train", "validation", "test")])
    assert len(examples) == len(records) == stats.examples
    assert stats.unanswerable == 0
    by_id = {r["id"]: r for r in records}
    for ex in examples:
        r = by_id[ex.id]
        assert (ex.question, ex.context) == (r["question"], r["context"])
        assert ex.answers == [(r["answers"]["text"][0], r["answers"]["answer_start"][0])]
