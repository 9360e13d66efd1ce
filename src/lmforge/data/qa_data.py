"""An extractive question-answering set built from real text on every machine: the documented functions of the
Python standard library. Each context is a function's signature line and its docstring; the questions come from the
docstring's structure and each answer is an exact span of the context, in the Hugging Face SQuAD layout.

Kinds of question (`KINDS`), each from a pattern seen in real stdlib docstrings:
- `does`: "What does `json.dumps` do?" -> the docstring's first sentence (its summary).
- `default`: "What is the default value of `indent` in `json.dumps`?" -> the default's source in the signature line.
- `returns`: "What does `X` return?" -> the rest of a sentence "Return(s) ...", or of a ":return:" / "Returns:" entry.
- `raises`: "What exception does `X` raise if ...?" -> the exception named in "Raise(s) E if ...", "E is raised
  when ...", "If ..., E is raised", a "Raises:" entry; "What exception can `X` raise?" for a lone ":raises E:".
- `param`: "What is `name` in `X`?" -> the first sentence of `name -- ...`, ":param name: ...", a "name : type" (numpy)
  or an "Args:" (google) entry, for names that are parameters of the function.

Split by module (a stable hash, ~80/10/10), so no module's docstrings straddle splits; deterministic for a seed and
a Python version. `write_qa_data` writes the files with a manifest and README; `ensure_qa_data` builds them once."""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

from ..atomic import write_file, write_text
from ..splits import in_fraction
from .stdlib import documented_defs

__all__ = ["documented_functions", "function_questions", "split_of", "qa_records", "write_qa_data", "ensure_qa_data",
           "KINDS", "BUILDER_VERSION"]

BUILDER_VERSION = 1
"""Bumped whenever the builder's output changes, so `ensure_qa_data` rebuilds stale folders."""

KINDS = ("does", "default", "returns", "raises", "param")
SPLITS = ("train", "validation", "test")
MIN_DOC_CHARS = 60
MAX_ANSWER_CHARS = 200
MAX_DEFAULT_CHARS = 30
MAX_CONDITION_CHARS = 160

Record = dict[str, Any]

# ---- the functions ---------------------------------------------------------------------------------------------


def documented_functions(root: str | Path | None = None,
                         min_doc_chars: int = MIN_DOC_CHARS) -> list[dict[str, Any]]:
    """{"module", "qualname" (module.Class.name), "signature", "docstring", "node"} for the documented functions of
    `stdlib.documented_defs` whose docstring has `min_doc_chars` (a name defined twice counts once)."""
    out = []
    seen: set[str] = set()
    for module, qualname, f, doc in documented_defs(root):
        full = f"{module}.{qualname}"
        if len(doc) < min_doc_chars or full in seen:  # a redefinition (property setter, overload) counts once
            continue
        seen.add(full)
        out.append({"module": module, "qualname": full, "signature": f"{full}({ast.unparse(f.args)})",
                    "docstring": doc, "node": f})
    return out


# ---- sentences -------------------------------------------------------------------------------------------------

_ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf", "approx", "resp", "Mr", "Dr", "No", "no")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.\s|[-*+] |\d+[.)] )")


def _end_of_sentence(text: str, start: int, stop: int) -> int:
    """The index of the first sentence-ending punctuation mark in text[start:stop] (abbreviations skipped), else
    `stop` (the sentence runs to the end of its paragraph or entry)."""
    for m in _SENTENCE_END.finditer(text, start, stop):
        word = re.search(r"[\w.]*$", text[start:m.start()]).group()
        if m.group() == "." and (word.endswith(_ABBREVIATIONS) or word.endswith(".")
                                 or re.search(r"(?:\b\w\.)+\w$", word)):
            continue  # "e.g. ", "a.k.a. ", "..."
        return m.start()
    return stop


def _paragraphs(doc: str) -> Iterator[tuple[int, int]]:
    """(start, end) of the blank-line separated paragraphs of a docstring that are prose: not doctest
    transcripts, lists or indented blocks."""
    for m in re.finditer(r"\S(?:.|\n(?![ \t]*\n))*", doc):
        indented = m.start() > doc.rfind("\n", 0, m.start()) + 1
        if indented or any(_CODE_LINE.match(line) for line in m.group().split("\n")):
            continue
        yield m.start(), m.end()


def _sentences(doc: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each sentence of the prose paragraphs, the end before its final punctuation mark."""
    for p0, p1 in _paragraphs(doc):
        i = p0
        while i < p1:
            end = _end_of_sentence(doc, i, p1)
            yield i, end
            nxt = re.compile(r"\S").search(doc, end + 1, p1)
            i = nxt.start() if nxt else p1


def _answer(doc: str, start: int, end: int) -> tuple[int, int] | None:
    """The span trimmed of surrounding whitespace and a trailing period or comma; None when its length is out of
    bounds or it leads into a list (ends with ":")."""
    while start < end and doc[start].isspace():
        start += 1
    while end > start and (doc[end - 1].isspace() or doc[end - 1] in ".,;"):
        end -= 1
    if not 2 <= end - start <= MAX_ANSWER_CHARS or doc[end - 1] == ":" or re.search(r"\S {3,}\S", doc[start:end]):
        return None  # runs of spaces: a table row, not prose
    return start, end


def _entry_end(doc: str, start: int, entry: re.Pattern[str], indent: int, lenient: bool) -> int:
    """Where a field entry starting at `start` (a `name -- text` or `name: text` line) ends: at a blank line, the
    next entry, or a line indented no deeper than the entry -- or, `lenient` (loosely formatted `--` entries),
    only one starting with a capital letter after a line without sentence-final punctuation."""
    line_end = doc.find("\n", start)
    while line_end != -1:
        nxt_end = doc.find("\n", line_end + 1)
        line = doc[line_end + 1:nxt_end if nxt_end != -1 else len(doc)]
        deeper = len(line) - len(line.lstrip()) > indent
        if not line.strip() or entry.match(line) or line.lstrip().startswith(":") or \
                not (deeper or (lenient and line.lstrip()[:1].islower())):
            return line_end
        line_end = nxt_end
    return len(doc)


# ---- question finders (each yields (question, answer start, answer end) in docstring offsets) -------------------

_EXC = r"(?:[A-Z]\w*(?:Error|Exception|Warning)|StopIteration|StopAsyncIteration|KeyboardInterrupt|SystemExit)"
_COND = r"(?:[Ii]f|[Ww]hen(?:ever)?|[Uu]nless|[Ii]n\s+case)\b"
_RAISE_FIRST = re.compile(rf"Raises?\s+(?:an?\s+)?(?P<exc>{_EXC})(?:\s+exception)?\s+(?P<cond>{_COND}[^\0]*)")
_RAISED_AFTER = re.compile(rf"(?:\b[Aa]n?\s+)?\b(?P<exc>{_EXC})(?:\s+exception)?\s+"
                           rf"(?:is|will\s+be)\s+raised\s+(?P<cond>{_COND}[^\0]*)")
_COND_FIRST = re.compile(rf"(?P<cond>(?:If|When|In\s+case)\b[^,]*),\s+(?:(?:an?\s+)?(?P<exc>{_EXC})(?:\s+exception)?"
                         rf"\s+(?:is|will\s+be)\s+raised|raises?\s+(?:an?\s+)?(?P<exc2>{_EXC}))$")
_RAISES_ENTRY = re.compile(rf"(?m)^[ \t]*(?P<exc>{_EXC}):?[ \t]+(?P<cond>{_COND}[^\n]*(?:\n[ \t]+\S[^\n]*)*)")
_RAISES_FIELD = re.compile(rf"(?m)^:raises? (?P<exc>{_EXC}):")
_RETURN_FIELD = re.compile(r"(?m)^:returns?:[ \t]*(?=\S)")
_RETURN_HEADER = re.compile(r"(?m)^([ \t]*)Returns:[ \t]*\n[ \t]*(?=\S)")
_HEADER = re.compile(r"(?m)^([ \t]*)(?:Args|Arguments|Parameters|Keyword [Aa]rguments|Optional arguments):[ \t]*$")
_DASH_ENTRY = re.compile(r"(?m)^([ \t]*)\*?(\w+)\*?(?: \(optional\))?[ \t]+--[ \t]+(?=\S)")
_PARAM_FIELD = re.compile(r"(?m)^:param (?:[\w.\[\], ]+ )?(\w+):[ \t]*(?=\S)")
_GOOGLE_ENTRY = re.compile(r"(?m)^([ \t]+)\*{0,2}(\w+)(?: \([^)\n]*\))?:[ \t]+(?=\S)")
_NUMPY_ENTRY = re.compile(r"(?m)^([ \t]*)(\w+) : [^\n]+\n[ \t]+(?=\S)")


def _condition(text: str) -> str | None:
    cond = " ".join(text.split())
    cond = cond[0].lower() + cond[1:]
    return cond if len(cond) <= MAX_CONDITION_CHARS else None


def _raises(doc: str, title: str) -> Iterator[tuple[str, int, int]]:
    for s0, s1 in _sentences(doc):
        sentence = doc[s0:s1]
        m = _RAISE_FIRST.match(sentence) or _COND_FIRST.match(sentence) or _RAISED_AFTER.search(sentence)
        if m and not re.search(r"\b(?:no|not|never)\s+$", sentence[:m.start()]) \
                and (cond := _condition(m.group("cond"))):
            group = "exc" if m.group("exc") else "exc2"
            yield f"What exception does `{title}` raise {cond}?", s0 + m.start(group), s0 + m.end(group)
    for header in re.finditer(r"(?m)^[ \t]*Raises:[ \t]*\n", doc):
        block_end = doc.find("\n\n", header.end())
        for m in _RAISES_ENTRY.finditer(doc, header.end(), block_end if block_end != -1 else len(doc)):
            cond = _condition(doc[m.start("cond"):_end_of_sentence(doc, m.start("cond"), m.end("cond"))])
            if cond:
                yield f"What exception does `{title}` raise {cond}?", m.start("exc"), m.end("exc")
    fields = list(_RAISES_FIELD.finditer(doc))
    if len({m.group("exc") for m in fields}) == 1:
        yield f"What exception can `{title}` raise?", fields[0].start("exc"), fields[0].end("exc")


def _returns(doc: str, title: str) -> Iterator[tuple[str, int, int]]:
    found = []
    for s0, s1 in _sentences(doc):
        m = re.match(r"Returns? (?=\S)", doc[s0:s1])
        if m:
            found.append((s0 + m.end(), s1))
    for m in _RETURN_FIELD.finditer(doc):
        start = m.end()
        end = _entry_end(doc, start, _RETURN_FIELD, 0, True)
        found.append((start, _end_of_sentence(doc, start, end)))
    for m in _RETURN_HEADER.finditer(doc):
        start = m.end()
        end = doc.find("\n\n", start)
        end = len(doc) if end == -1 else end
        nxt = re.compile(r"(?m)^[ \t]*\w+:[ \t]*$").search(doc, start, end)  # the next section ("Raises:")
        found.append((start, _end_of_sentence(doc, start, nxt.start() if nxt else end)))
    for start, end in sorted(found)[:1]:  # one "What does X return?" per function: the first answer
        span = _answer(doc, start, end)
        if span:
            yield f"What does `{title}` return?", *span


def _params(doc: str, title: str, names: set[str]) -> Iterator[tuple[str, str, int, int]]:
    """(name, question, start, end) for each documented parameter, the first description of a name only."""
    entries = []
    for m in _DASH_ENTRY.finditer(doc):
        entries.append((m.group(2), m.end(), _entry_end(doc, m.end(), _DASH_ENTRY, len(m.group(1)), True)))
    for m in _PARAM_FIELD.finditer(doc):
        entries.append((m.group(1), m.end(), _entry_end(doc, m.end(), _PARAM_FIELD, 0, True)))
    for header in _HEADER.finditer(doc):
        indent = len(header.group(1))
        block_end = doc.find("\n\n", header.end())
        block_end = len(doc) if block_end == -1 else block_end
        for m in _GOOGLE_ENTRY.finditer(doc, header.end(), block_end):
            if len(m.group(1)) > indent:
                entries.append((m.group(2), m.end(), _entry_end(doc, m.end(), _GOOGLE_ENTRY, len(m.group(1)), False)))
    for m in _NUMPY_ENTRY.finditer(doc):
        entries.append((m.group(2), m.end(), _entry_end(doc, m.end() - 1, _NUMPY_ENTRY, len(m.group(1)), False)))
    done = set()
    for name, start, end in sorted(entries, key=lambda e: e[1]):
        if name not in names or name in done:
            continue
        done.add(name)
        span = _answer(doc, start, _end_of_sentence(doc, start, end))
        if span:
            yield name, f"What is `{name}` in `{title}`?", *span


def _does(doc: str, title: str) -> Iterator[tuple[str, int, int]]:
    first = doc.split("\n\n", 1)[0]
    if re.match(r"^[\w.]+\(.*\)", first) or first.startswith(">>>"):
        return  # "name(args) -> type" lines: a signature, not a summary
    end = _end_of_sentence(doc, 0, len(first.rstrip()))
    span = _answer(doc, 0, end)
    if span and _prose(doc[span[0]:span[1]]):
        yield f"What does `{title}` do?", *span


def _prose(summary: str) -> bool:
    """False for summaries that are really usage lines or notation: "data -> marshalled data", pdb's usage line
    before "Restart ...", imaplib's "(typ, [data]) = ...", "+" (inherited docs), a lead-in ending in ":"."""
    lines = summary.split("\n")
    return (len(summary.split()) >= 3 and "->" not in summary and " = " not in summary
            and summary[0] not in "(+" and not any(line.rstrip().endswith(":") or not re.search(r"\w", line)
                                                 for line in lines)
            and not (summary[0].islower() and re.search(r"\n[A-Z(]", summary)))


def _defaults(signature: str, node: ast.FunctionDef | ast.AsyncFunctionDef,
              title: str) -> Iterator[tuple[str, str, int, int]]:
    """(name, question, start, end) in signature offsets for each parameter with a short default."""
    a = node.args
    positional = a.posonlyargs + a.args
    pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
    pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
    for arg, default in pairs:
        text = ast.unparse(default)
        needle = arg.arg + (f": {ast.unparse(arg.annotation)}" if arg.annotation else "") + "=" + text
        m = re.search(rf"(?<=[(,*] ){re.escape(needle)}(?=[,)])|(?<=\(){re.escape(needle)}(?=[,)])", signature)
        if m and 0 < len(text) <= MAX_DEFAULT_CHARS:
            yield arg.arg, f"What is the default value of `{arg.arg}` in `{title}`?", m.end() - len(text), m.end()


def _varied(defaults: list[tuple[str, str, int, int]], signature: str) -> list[tuple[str, int, int]]:
    """The defaults with distinct values, other values before `None` (which would otherwise answer almost half)."""
    seen, out = set(), []
    for _, q, s, e in sorted(defaults, key=lambda d: signature[d[2]:d[3]] == "None"):
        if signature[s:e] not in seen:
            seen.add(signature[s:e])
            out.append((q, s, e))
    return out


def function_questions(function: dict[str, Any], seed: int = 0, per_function: int = 4) -> list[Record]:
    """The SQuAD-layout records of one `documented_functions` entry: at most one `does` and `returns`, two of each
    other kind (defaults of distinct values), `per_function` in all (rarer kinds first), none whose question holds
    its answer; every answer is sliced from the context, so answer_start points at the right occurrence."""
    title, signature, doc = function["qualname"], function["signature"], function["docstring"]
    context = f"{signature}\n\n{doc}"
    shift = len(signature) + 2  # docstring offsets -> context offsets
    a = function["node"].args
    names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x} - {"self", "cls"}
    rnd = random.Random(f"{seed}:{title}")
    defaults = list(_defaults(signature, function["node"], title))
    params = list(_params(doc, title, names))
    found = {"does": [(q, s + shift, e + shift) for q, s, e in _does(doc, title)],
             "returns": [(q, s + shift, e + shift) for q, s, e in _returns(doc, title)],
             "raises": [(q, s + shift, e + shift) for q, s, e in _raises(doc, title)][:2],
             "param": [(q, s + shift, e + shift) for _, q, s, e in rnd.sample(params, min(2, len(params)))],
             "default": _varied(rnd.sample(defaults, len(defaults)), signature)[:2]}
    order = ("raises", "returns", "param", "does", "default")
    picked = [(k, found[k][i]) for i in range(2) for k in order if i < len(found[k])]
    records, questions = [], set()
    for kind, (question, start, end) in picked:
        text = context[start:end]
        if text.lower() in question.lower() or question in questions or len(records) == per_function:
            continue  # an answer the question gives away, or the same question twice
        questions.add(question)
        n = sum(r["kind"] == kind for r in records)
        records.append({"id": f"{title}:{kind}:{n}", "title": title, "context": context, "question": question,
                        "answers": {"text": [text], "answer_start": [start]}, "kind": kind,
                        "module": function["module"]})
    return records


# ---- the data set ----------------------------------------------------------------------------------------------

def split_of(module: str, seed: int = 0, held_out: float = 0.1) -> str:
    """The split of a module: one stable hash puts `held_out` of the modules in validation, as many in test."""
    if in_fraction(module, held_out, seed):
        return "validation"
    return "test" if in_fraction(module, 2 * held_out, seed) else "train"


def qa_records(seed: int = 0, per_function: int = 4, per_module: int = 60,
               functions: list[dict[str, Any]] | None = None) -> dict[str, list[Record]]:
    """{"train", "validation", "test"} lists of SQuAD-layout records ({"id", "title", "context", "question",
    "answers": {"text": [t], "answer_start": [s]}, "kind", "module"}) from the stdlib's documented functions, split
    by module; at most `per_module` questions of a module (whole functions, picked with `seed`)."""
    functions = documented_functions() if functions is None else functions
    by_module: dict[str, list[dict[str, Any]]] = {}
    for f in functions:
        by_module.setdefault(f["module"], []).append(f)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for module, funcs in by_module.items():
        per = {f["qualname"]: function_questions(f, seed, per_function) for f in funcs}
        order = [f["qualname"] for f in funcs]
        random.Random(f"{seed}:{module}").shuffle(order)
        kept, n = set(), 0
        for name in order:
            if n + len(per[name]) <= per_module:
                kept.add(name)
                n += len(per[name])
        out[split_of(module, seed)] += [r for f in funcs if f["qualname"] in kept for r in per[f["qualname"]]]
    return out


def _counts(splits: dict[str, list[Record]]) -> dict[str, dict[str, int]]:
    return {s: {"records": len(rs), "modules": len({r["module"] for r in rs}),
                "functions": len({r["title"] for r in rs}),
                **{k: sum(r["kind"] == k for r in rs) for k in KINDS}} for s, rs in splits.items()}


def _inputs(seed: int) -> dict[str, Any]:
    return {"builder_version": BUILDER_VERSION, "python": sys.version.split()[0], "seed": seed}


def write_qa_data(folder: str | Path, seed: int = 0, progress: Callable[[str], None] | None = None) -> Path:
    """Build the set into `folder`: train.jsonl, validation.jsonl, test.jsonl, manifest.json (counts per split and
    kind, inputs, sha256) and README.md, each written atomically, the manifest last; returns the folder."""
    out = Path(folder)
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    say("reading the standard library's docstrings")
    splits = qa_records(seed)
    files = {}
    for split, records in splits.items():
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        write_file(out / f"{split}.jsonl", lambda tmp, data=data: tmp.write_bytes(data))
        files[f"{split}.jsonl"] = {"records": len(records), "sha256": hashlib.sha256(data).hexdigest()}
    examples = {}
    for r in splits["train"] + splits["validation"] + splits["test"]:
        examples.setdefault(r["kind"], r)
    manifest = {"inputs": _inputs(seed), "files": files, "counts": _counts(splits),
                "seconds": round(time.perf_counter() - t0, 2)}
    write_text(out / "README.md", _readme(manifest, examples))
    write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    say(f"{sum(f['records'] for f in files.values())} questions written")
    return out


def _readme(manifest: dict[str, Any], examples: dict[str, Record]) -> str:
    counts = manifest["counts"]
    rows = [f"| {s} | {c['records']} | {c['modules']} | {c['functions']} | "
            + " | ".join(str(c[k]) for k in KINDS) + " |" for s, c in counts.items()]
    kinds = []
    for k in KINDS:
        if k in examples:
            r = examples[k]
            kinds.append(f"- `{k}`: {r['question']} -> {json.dumps(r['answers']['text'][0], ensure_ascii=False)}")
    return "\n".join([
        "# Extractive QA from the Python standard library (generated: do not edit, do not commit)",
        "",
        "Built by `lmforge.data.qa_data` from the source of the Python "
        f"{manifest['inputs']['python']} standard library on this machine. Each context is a public function's "
        "signature line (rendered from its `ast`) and its docstring; each question comes from the docstring's "
        "structure and its answer is an exact span of the context (SQuAD layout: `answers.text`, "
        "`answers.answer_start`). Split by module with a stable hash (about 80/10/10), so no module is in two "
        "splits. Deterministic for the same seed and Python version.",
        "",
        "| split | questions | modules | functions | " + " | ".join(KINDS) + " |",
        "|---|---|---|---|" + "---|" * len(KINDS),
        *rows,
        "",
        "Kinds, one example each:",
        *kinds,
        "",
        f"Inputs: {manifest['inputs']}.",
        ""])


def ensure_qa_data(folder: str | Path, progress: Callable[[str], None] | None = None) -> Path:
    """The folder of the built QA set, building it first when missing or built by another builder version or
    Python version -- so a recipe can name `{qa}/train.jsonl` without a setup step."""
    out = Path(folder)
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        fresh = manifest.get("inputs") == _inputs(0) and all((out / n).exists() for n in manifest.get("files", {}))
    except (FileNotFoundError, json.JSONDecodeError):
        fresh = False
    if not fresh:
        write_qa_data(out, progress=progress)
    return out
