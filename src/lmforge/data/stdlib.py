"""Real data on every machine: the Python standard library's own source. Multiple-choice questions from docstrings,
interpreter outputs from doctests, held-out modules for perplexity, and function summaries for preference pairs,
all read from the source files of this Python, so they need no download and are the same on every machine with
the same Python version."""

from __future__ import annotations

import ast
import importlib
import os
import random
import re
import sysconfig
from pathlib import Path
from typing import Any, Iterator

from ..splits import in_fraction

__all__ = ["documented_defs", "stdlib_docstring_items", "stdlib_doctest_items", "stdlib_doctest_gsm8k_items",
           "stdlib_heldout_texts", "stdlib_functions", "STDLIB_MC_MODULES", "DOCTEST_MODULES"]

STDLIB_MC_MODULES = ("json", "os.path", "textwrap", "string", "shutil", "base64", "inspect", "difflib",
                     "statistics", "calendar", "glob", "fnmatch")


def stdlib_docstring_items(n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """MMLU-format questions from real docstrings: "Which Python function does this docstring describe?" with the
    function's name and 3 other names of the same modules as choices (the name is masked in its docstring).

    Functions are read from the modules' source files (top-level `def`s with a docstring), not from the live
    modules, whose contents can depend on what else was imported (torch replaces a function of `inspect`)."""
    funcs = []
    for mod_name in STDLIB_MC_MODULES:
        source = Path(importlib.import_module(mod_name).__file__)  # os.path: posixpath or ntpath
        tree = ast.parse(source.read_text(encoding="utf-8"))
        docs = {node.name: ast.get_docstring(node) for node in tree.body
                if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node)}
        for k in sorted(docs):
            doc = docs[k].split("\n\n")[0].replace("\n", " ").replace(k, "___")
            funcs.append((mod_name, k, doc[:300]))
    rnd = random.Random(seed)
    rnd.shuffle(funcs)
    items = []
    for mod_name, name, doc in funcs[:n]:
        others = sorted({f[1] for f in funcs if f[1] != name})
        choices = rnd.sample(others, 3) + [name]
        rnd.shuffle(choices)
        items.append({"question": f"Which Python function does this docstring describe?\n{doc}",
                      "choices": choices, "answer": choices.index(name), "source": f"stdlib:{mod_name}.{name}"})
    return items


DOCTEST_MODULES = ("fractions", "collections", "heapq", "textwrap", "json", "typing", "enum", "difflib", "_pydecimal",
                   "statistics")  # a module before those importing it: a docstring counts once, under its home


def stdlib_doctest_items(n: int | None = None, seed: int = 0, context_examples: int = 8) -> list[dict[str, Any]]:
    """prompt/target records from the doctests of standard-library docstrings: the prompt is a header naming the
    docstring, its earlier examples (at most `context_examples`, the session state the example may need) and
    ">>> source\\n"; the target is the one-line output the interpreter printed. Shuffled with `seed`."""
    import doctest

    finder = doctest.DocTestFinder(recurse=True)
    records, seen = [], set()
    for mod_name in DOCTEST_MODULES:
        # module=False: _pydecimal names itself `decimal`, which may already be the C module in sys.modules, so
        # the finder's own module check would drop its objects; docstrings reached twice are skipped instead
        for test in sorted(finder.find(importlib.import_module(mod_name), mod_name, module=False),
                           key=lambda t: t.name):
            private = any(p.startswith("_") and not p.startswith("__") for p in test.name.split(".")[1:])
            if (test.filename, test.docstring) in seen or private:
                continue  # reached twice, or a private helper (which other packages may replace: typing_extensions)
            seen.add((test.filename, test.docstring))
            shown: list[str] = []
            for ex in test.examples:
                one_line = ex.source.count("\n") == 1 and ex.want.count("\n") == 1
                if one_line and "Traceback" not in ex.want and len(ex.want) <= 60 and not ex.options:
                    prompt = f"# {test.name}\n" + "".join(shown[-context_examples:]) + f">>> {ex.source}"
                    records.append({"prompt": prompt, "target": ex.want.rstrip("\n"),
                                    "source": f"stdlib:{test.name}:{ex.lineno}"})
                shown.append(">>> " + ex.source.replace("\n", "\n... ", ex.source.count("\n") - 1) + ex.want)
    random.Random(seed).shuffle(records)
    return records[:n]


def stdlib_doctest_gsm8k_items(n: int | None = None) -> list[dict[str, Any]]:
    """The numeric-output doctest examples as GSM8K records: question "What does the last line print?" + the
    transcript, answer a worked sentence ending in "#### N", so GSM8K's prompt, regex and normalisation apply."""
    numeric = [r for r in stdlib_doctest_items() if re.fullmatch(r"-?[0-9][0-9.,]*", r["target"])][:n]
    return [{"question": "What does the last line print?\n" + r["prompt"].rstrip("\n"),
             "answer": f"The interpreter prints {r['target']}.\n#### {r['target']}", "source": r["source"]}
            for r in numeric]


def stdlib_heldout_texts(n: int = 20, fraction: float = 0.05) -> list[tuple[str, str]]:
    """(name, source) of standard-library modules in a fixed held-out slice: the files whose name `in_fraction`
    puts in `fraction` (stable across machines with the same Python), at most n, in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    picked = [p for p in sorted(root.glob("*.py")) if in_fraction(p.name, fraction)][:n]
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in picked]


SKIP_PARTS = frozenset({"test", "tests", "idlelib", "tkinter", "lib2to3", "turtledemo", "ensurepip", "site-packages",
                        "dist-packages", "__pycache__", "venv", "pydoc_data", "distutils", "msilib", "encodings",
                        "unittest", "config-3"})


def _summary(doc: str, max_chars: int) -> str | None:
    """The docstring's first paragraph on one line, cut after the last full sentence within max_chars; None when it
    is a signature line, too short, or has no sentence end within the limit."""
    text = " ".join(doc.split("\n\n")[0].split())
    if re.match(r"^[\w.]+\(.*\)", text) or len(text) < 25:  # "name(args) -> type" lines, "Return x." stubs
        return None
    if len(text) > max_chars:
        cut = max(text.rfind(". ", 0, max_chars), text.rfind("; ", 0, max_chars))
        if cut < 25:
            return None
        text = text[:cut + 1]
    return text


def documented_defs(root: str | Path | None = None) -> Iterator[tuple[str, str, ast.FunctionDef, str]]:
    """(module, qualname in the module, ast node, docstring) of every public top-level function and public method of
    a public top-level class, with a docstring, in the standard library's public modules (SKIP_PARTS and private
    names left out), in sorted file order; read with `ast` from the source files, not from live objects (whose
    contents depend on what else was imported). A name defined twice in one module (a property setter, an
    overload) comes once per definition."""
    root = Path(root or sysconfig.get_paths()["stdlib"])

    def public(part: str) -> bool:
        return part not in SKIP_PARTS and not part.startswith(("_", "config-", "."))

    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if public(d)]  # prune test suites, site-packages, private packages
        paths += [Path(dirpath) / f for f in filenames if f.endswith(".py") and (public(f) or f == "__init__.py")]
    for path in sorted(paths):
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are templates or test data, not Python of this version
        for node in tree.body:
            defs = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs.append((node.name, node))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                defs += [(f"{node.name}.{m.name}", m) for m in node.body
                         if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for qualname, f in defs:
                doc = ast.get_docstring(f)
                if not qualname.rsplit(".", 1)[-1].startswith("_") and doc:
                    yield module, qualname, f, doc


def stdlib_functions(root: str | Path | None = None, max_chars: int = 400,
                     max_per_module: int = 40) -> list[dict[str, str]]:
    """{"module", "name", "qualname", "summary"} for the documented functions of `documented_defs`. Summaries that
    contain the function's own name are left out, so an answer cannot be matched to its question by the name."""
    by_module: dict[str, list[dict[str, str]]] = {}
    for module, qualname, _, doc in documented_defs(root):
        name = qualname.rsplit(".", 1)[-1]
        summary = _summary(doc, max_chars)
        found = by_module.setdefault(module, [])
        if summary is None or any(g["qualname"] == f"{module}.{qualname}" for g in found) \
                or re.search(rf"\b{re.escape(name)}\b", summary):
            continue
        found.append({"module": module, "name": name, "qualname": f"{module}.{qualname}",
                                                 "summary": summary})
    out = []
    for module, found in by_module.items():
        if len(found) > max_per_module:  # a few huge modules (turtle, logging) would dominate otherwise
            found = random.Random(f"{module}").sample(found, max_per_module)
            found.sort(key=lambda f: f["qualname"])
        out += found
    return out
