"""Verifiable rewards for the RL stages: plain Python functions of a completion and its prompt record.

A reward function is `f(completion: str, record: dict, **options) -> float | None`, or, marked with
`f.batched = True`, `f(completions: list[str], records: list[dict], **options) -> list[float | None]` (for rewards
that are cheaper together, such as running unit tests in parallel). `None` means "cannot be scored": the completion
is left out of its group's baseline and gets advantage 0 (as TRL). The config names a function by a built-in name
(`exact_match`, `regex_format`, `unit_tests`) or as `package.module:function` (or `path/to/file.py:function`), with
keyword `options` and a `weight`; several rewards add up, weighted (`Rewards`).

Code-executing rewards run in the sandbox of `sandbox/` (a child interpreter with time, memory and file
limits, no processes and no sockets): code that loops forever, allocates without bound, writes outside its temporary
directory or opens a socket is stopped or refused, and its reward is 0, never an exception.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

__all__ = ["RewardSpec", "Rewards", "resolve_reward", "exact_match", "regex_format", "unit_tests", "BUILTIN_REWARDS"]

log = logging.getLogger(__name__)


# ---- built-in rewards ------------------------------------------------------------------------------------------

_FENCED = re.compile(r"^```[\w+-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)


def _strip_code(text: str) -> str:
    """An answer wrapped in a code fence (```lang ... ```) or in inline backticks, unwrapped."""
    m = _FENCED.match(text)
    if m:
        return m.group(1).strip()
    if len(text) >= 2 and text[0] == text[-1] == "`":
        return text.strip("`").strip()
    return text


def _normalise(text: str, strip_code: bool, ignore_case: bool, ignore_whitespace: bool,
               ignore_punctuation: bool) -> str:
    text = text.strip()
    if strip_code:
        text = _strip_code(text)
    if ignore_whitespace:
        text = " ".join(text.split())
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(completion: str, record: dict[str, Any], *, field: str = "answer", regex: str | None = None,
                first_line: bool = False, strip_code: bool = True, ignore_case: bool = False,
                ignore_whitespace: bool = False, ignore_punctuation: bool = False) -> float:
    """1.0 when the completion equals the record's `field` (a string, a number, or a list of accepted answers),
    else 0.0. Before comparing: with `regex`, the completion is replaced by the first non-empty group of its first
    match (no match: 0.0); with `first_line`, by its first non-empty line; both sides are stripped, unwrapped from
    a code fence or backticks (`strip_code`), and optionally compared ignoring case, runs of whitespace and ASCII
    punctuation."""
    answers = record[field]
    answers = answers if isinstance(answers, list) else [answers]
    text = completion
    if regex is not None:
        m = re.search(regex, text)
        if m is None:
            return 0.0
        text = next((g for g in m.groups() if g), m.group(0)) if m.groups() else m.group(0)
    if first_line:
        text = next((line for line in text.splitlines() if line.strip()), "")
    norm = (strip_code, ignore_case, ignore_whitespace, ignore_punctuation)
    got = _normalise(text, *norm)
    return 1.0 if any(got == _normalise(str(a), *norm) for a in answers) else 0.0


exact_match.fields = lambda options: [options.get("field", "answer")]  # type: ignore[attr-defined]

_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "a": re.ASCII}


def _flags(letters: str) -> int:
    bad = sorted(set(letters) - set(_FLAGS))
    if bad:
        raise ValueError(f"flags: unknown letter(s) {bad}; expected some of {''.join(_FLAGS)} "
                         "(ignorecase, multiline, dotall, verbose, ascii)")
    out = 0
    for c in letters:
        out |= _FLAGS[c]
    return out


def regex_format(completion: str, record: dict[str, Any], *, pattern: str,
                 mode: Literal["fullmatch", "match", "search"] = "fullmatch", flags: str = "s",
                 strip: bool = True) -> float:
    """1.0 when the completion has the format `pattern` describes, else 0.0: the whole completion (`fullmatch`),
    its beginning (`match`) or any part of it (`search`); `flags` are letters of re flags (i, m, s, x, a; default
    s: `.` matches newlines); `strip` drops surrounding whitespace first. E.g. pattern
    `<think>.*</think>\\s*<answer>.*</answer>` for the R1 format."""
    if mode not in ("fullmatch", "match", "search"):
        raise ValueError(f"mode: expected fullmatch, match or search, found {mode!r}")
    text = completion.strip() if strip else completion
    return 1.0 if getattr(re, mode)(pattern, text, _flags(flags)) else 0.0


def _check_regex_format(options: dict[str, Any]) -> None:
    if "pattern" in options:
        re.compile(options["pattern"], _flags(options.get("flags", "s")))


regex_format.check = _check_regex_format  # type: ignore[attr-defined]


def unit_tests(completions: Sequence[str], records: Sequence[dict[str, Any]], *, tests_field: str = "tests",
               entry_point_field: str = "entry_point", prefix_field: str | None = None,
               extract: Literal["auto", "raw"] = "auto", timeout_s: float = 5.0, cpu_s: int = 5,
               memory_mb: int = 512, workers: int = 2) -> list[float]:
    """1.0 for each completion whose code passes its record's tests in the sandbox, else 0.0 (failures, syntax
    errors, timeouts, memory exhaustion, refused operations: all 0.0, never an exception).

    The code is the first fenced block of the completion (```python ... ```), or the completion itself when it
    has none (`extract: raw` always takes it whole). The program run is the record's `prefix_field` (e.g. the
    HumanEval signature, for its imports) when given, then the code; the record's `tests_field` (assert statements
    calling the program's functions, or a `def check(candidate)` which is then called with the record's
    `entry_point_field`, HumanEval-style) runs in a separate judge process with the prefix as trusted context, so
    the code can neither read the tests nor forge their verdict."""
    from ..data.code_problems import extract_code
    from ..sandbox import CodeTest, SandboxLimits, run_many

    if extract not in ("auto", "raw"):
        raise ValueError(f"extract: expected auto or raw, found {extract!r}")
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb)
    limits.validate()
    jobs, runnable = [], []
    for i, (completion, record) in enumerate(zip(completions, records, strict=True)):
        code = extract_code(completion) if extract == "auto" else completion
        if not code.strip():
            continue
        prefix = str(record[prefix_field]) + "\n" if prefix_field else ""
        jobs.append(CodeTest(code=prefix + code + "\n", tests=str(record[tests_field]), context=prefix,
                             entry_point=record.get(entry_point_field) or None))
        runnable.append(i)
    scores = [0.0] * len(completions)
    for i, r in zip(runnable, run_many(jobs, limits, workers=workers)):
        if r.status == "passed":
            scores[i] = 1.0
        elif r.status == "error":  # the sandbox itself could not run the program: say so, score 0
            log.warning("unit_tests: the sandbox could not run a program (%s); its reward is 0", r.detail)
    return scores


unit_tests.batched = True  # type: ignore[attr-defined]
unit_tests.fields = lambda options: [options.get("tests_field", "tests")] + (  # type: ignore[attr-defined]
    [options["prefix_field"]] if options.get("prefix_field") else [])

_REWARD_MODELS: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def _reward_model(path: str, dtype: str, device: str):
    """(model, tokenizer) of a reward model, loaded once per process (scoring runs every round)."""
    key = (str(path), dtype, device)
    if key not in _REWARD_MODELS:
        import torch

        from ..transforms.peft import load

        model, tok = load(path, dtype=getattr(torch, dtype), device=device)
        if model.cfg.head != "classifier" or model.cfg.num_labels != 1 or tok is None:
            raise ValueError(f"reward_model: {path} is not a reward model (a classifier with one output and a "
                             f"tokenizer, as `lmforge reward` writes); found head={model.cfg.head!r}, "
                             f"num_labels={model.cfg.num_labels}")
        _REWARD_MODELS[key] = (model.eval().requires_grad_(False), tok)
    return _REWARD_MODELS[key]


def reward_model(completions: Sequence[str], records: Sequence[dict[str, Any]], *, path: str,
                 batch_size: int = 16, dtype: str = "float32", device: str = "cpu",
                 max_length: int = 1024) -> list[float]:
    """The scalar score r(x, y) of a trained reward model (`lmforge reward`) for each prompt + completion: the
    conversation rendered with the reward model's own chat template up to the end of the reply, then its
    end-of-sequence token, the token its head read in training (`data.preference.scoring_text`)."""
    import torch

    from ..data.preference import scoring_text

    model, tok = _reward_model(path, dtype, device)
    rows = []
    for completion, record in zip(completions, records, strict=True):
        messages = record.get("messages") or [{"role": "user", "content": str(record["prompt"])}]
        ids = tok.encode(scoring_text(tok, list(messages), completion), add_special_tokens=False) + [tok.eos_id]
        rows.append(ids[-max_length:])
    scores: list[float] = []
    pad = tok.padding_id
    with torch.no_grad():
        for a in range(0, len(rows), batch_size):
            chunk = rows[a:a + batch_size]
            longest = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            out = model(ids.to(device), attention_mask=mask.to(device)).logits  # (B, 1)
            scores += out[:, 0].float().tolist()
    return scores


reward_model.batched = True  # type: ignore[attr-defined]
reward_model.fields = lambda options: []  # type: ignore[attr-defined]


BUILTIN_REWARDS: dict[str, Callable[..., Any]] = {"exact_match": exact_match, "regex_format": regex_format,
                                                  "unit_tests": unit_tests, "reward_model": reward_model}
"""Reward functions known by name in configs."""


# ---- resolving config names ------------------------------------------------------------------------------------

def _import_module(module: str, name: str):
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise ValueError(f"reward {name!r}: file {path} not found")
        spec = importlib.util.spec_from_file_location(f"lmforge_user_rewards_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module!r} ({e}); it must be importable (installed "
                         "or on PYTHONPATH), or name a file as path/to/file.py:function") from e


def resolve_reward(name: str) -> Callable[..., Any]:
    """The function a config names: a built-in (exact_match, regex_format, unit_tests), `package.module:function`
    or `path/to/file.py:function`. Raises ValueError saying what was wrong and what is expected."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" not in name:
        near = difflib.get_close_matches(name, list(BUILTIN_REWARDS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown reward {name!r}{hint} Built-in rewards: {', '.join(BUILTIN_REWARDS)}; a function "
                         "of your own is named package.module:function or path/to/file.py:function")
    module, _, attr = name.rpartition(":")
    if not module or not attr:
        raise ValueError(f"reward {name!r}: expected package.module:function")
    mod = _import_module(module, name)
    fn = getattr(mod, attr, None)
    if fn is None:
        funcs = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))
        near = difflib.get_close_matches(attr, funcs, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"it defines {funcs[:10]}"
        raise ValueError(f"reward {name!r}: module {module!r} has no {attr!r}; {hint}")
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


@dataclass
class RewardSpec:
    """One reward function of the config, its weight and its options."""

    name: str = "exact_match"
    """A built-in reward (exact_match, regex_format, unit_tests) or your own, as package.module:function."""
    weight: float = 1.0
    """Weight of this reward in the weighted sum over rewards."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the function (exact_match: field, regex, ignore_case…; regex_format: pattern, mode…)."""

    def validate(self) -> None:
        self.resolve()

    def resolve(self) -> Callable[..., Any]:
        """The function, with the options checked against its signature (ValueError saying what is wrong)."""
        if not self.name:
            raise ValueError("name: expected a reward function name, found an empty string")
        fn = resolve_reward(self.name)
        try:
            _check_options(fn, self.options)
        except ValueError as e:
            raise ValueError(f"reward {self.name!r}: {e}") from None
        return fn


class Rewards:
    """Several reward functions, resolved and checked once: `score` gives their weighted sum per completion.

    Options are checked against each function's signature when the config is read, so a misspelt option fails
    before any model is loaded. A function returning None (cannot score) counts as missing: the sum skips it, and
    a completion with no score at all gets NaN (advantage 0 in GRPO)."""

    def __init__(self, specs: Sequence[RewardSpec]):
        if not specs:
            raise ValueError("rewards: give at least one reward function (e.g. name: exact_match)")
        self.specs = list(specs)
        self.fns: list[Callable[..., Any]] = []
        names: list[str] = []
        for i, spec in enumerate(self.specs):
            try:
                fn = spec.resolve()
            except ValueError as e:
                raise ValueError(f"rewards[{i}]: {e}") from None
            self.fns.append(fn)
            short = spec.name.rpartition(":")[2]
            names.append(short if short not in names else f"{short}_{i}")
        self.names = names
        self.weights = torch.tensor([s.weight for s in self.specs], dtype=torch.float32)

    def fields(self) -> list[str]:
        """Record fields the built-in rewards read with these options (user functions are not inspected)."""
        out: list[str] = []
        for fn, spec in zip(self.fns, self.specs):
            out += [f for f in getattr(fn, "fields", lambda o: [])(spec.options) if f not in out]
        return out

    def check_records(self, records: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Raise DataError at the first (where, record) that lacks a field a reward reads."""
        from ..data.readers import DataError

        needed = self.fields()
        for where, rec in records:
            missing = [f for f in needed if f not in rec]
            if missing:
                raise DataError(f"{where}: the rewards read field(s) {missing}, which this record lacks (fields "
                                f"{sorted(rec)})")

    def score(self, completions: Sequence[str], records: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor]:
        """(weighted sum (N,), each function's rewards (N, K)) in float32; NaN where a function gave None."""
        n = len(completions)
        if len(records) != n:
            raise ValueError(f"{n} completions but {len(records)} records")
        parts = torch.full((n, len(self.fns)), float("nan"))
        for k, (fn, spec) in enumerate(zip(self.fns, self.specs)):
            if getattr(fn, "batched", False):
                values = list(fn(list(completions), list(records), **spec.options))
                if len(values) != n:
                    raise ValueError(f"reward {spec.name}: returned {len(values)} values for {n} completions")
            else:
                values = [fn(c, r, **spec.options) for c, r in zip(completions, records)]
            for i, v in enumerate(values):
                if v is None:
                    continue
                if isinstance(v, Tensor):
                    v = v.item()
                if not isinstance(v, (int, float)):
                    raise TypeError(f"reward {spec.name}: returned {type(v).__name__} {v!r:.60}; expected a number "
                                    "or None")
                parts[i, k] = float(v)
        weighted = parts * self.weights  # (N, K) * (K,)
        total = torch.where(parts.isnan().all(-1), float("nan"), weighted.nansum(-1))  # (N,)
        return total, parts


def _check_options(fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """The options bind to the function's keyword parameters (after the two positional ones), and pass its own
    `check` when it has one; ValueError naming the option otherwise."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = list(sig.parameters.values())
    if len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) < 2 and not any(
            p.kind == p.VAR_POSITIONAL for p in params):
        raise ValueError(f"a reward function takes (completion, record, **options) (or lists of them, batched); "
                         f"{getattr(fn, '__name__', fn)}{sig} does not")
    accepted = [p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        for key in options:
            if key not in accepted:
                near = difflib.get_close_matches(key, accepted, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"its options are {accepted}"
                raise ValueError(f"unknown option {key!r}; {hint}")
    missing = [p.name for p in params[2:] if p.kind == p.KEYWORD_ONLY and p.default is p.empty
               and p.name not in options]
    if missing:
        raise ValueError(f"missing required option(s) {missing}")
    check = getattr(fn, "check", None)
    if check is not None:
        try:
            check(options)
        except (ValueError, re.error) as e:
            raise ValueError(str(e)) from None
