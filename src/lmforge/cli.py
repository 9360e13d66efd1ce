"""``lmforge <verb>``: parse arguments into the verb's dataclass config and run ``stages.<verb>.main``.

Stage modules are imported only when their verb runs, so ``lmforge --help`` stays fast.
A stage module defines ``Config`` (a dataclass), optionally ``POSITIONAL`` (field names filled
by positional arguments, in order) and ``main(cfg) -> int | None``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import json
import keyword
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

from lmforge.config import (
    COMMAND_LINE, ConfigError, dump_yaml, iter_fields, key_type, load_config, to_dict, type_name,
)
from lmforge.errors import DEBUG_ENV, InputError, debug_requested, one_line

INPUT_ERRORS = (ConfigError, InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""Errors about what the user gave (exit status 2); DataError and model-file errors are InputErrors."""

VERBS: dict[str, str] = {
    "generate": "Generate text from a model (plain or chat)",
    "convert": "Convert a model between Hugging Face folders and GGUF/other formats",
    "curate": "Curate raw documents: language, quality, dedup, PII, toxicity, perplexity, decontamination",
    "tokenizer": "Train a BPE or WordPiece tokenizer on documents and report bytes per token",
    "prepare": "Tokenize documents into token shards for pretraining",
    "pretrain": "Pretrain a decoder (causal LM) or encoder (masked LM + NSP) on token shards; torchrun-ready",
    "finetune": "Fine-tune a pretrained model: SFT or classification with full, freeze, LoRA, QLoRA, prompt, adapter",
    "serve": "Serve a model over an OpenAI-compatible HTTP API (completions, chat, embeddings, classify)",
    "chat": "Chat with a model in the terminal (streamed, with its chat template)",
    "evaluate": "Evaluate a model: multiple choice, generation, perplexity, HumanEval pass@k, classification, judge",
    "reward": "Train a reward model (Bradley-Terry on preference pairs) and report held-out pairwise accuracy",
    "dpo": "Preference optimisation without a reward model: DPO, IPO, KTO, SimPO, ORPO",
    "ppo": "RLHF with PPO: rollouts from the engine, reward model or functions, KL penalty, GAE, clipped objective",
    "grpo": "GRPO: G sampled completions per prompt, group-normalised verifiable rewards, clipped objective, KL",
    "quantize": "Quantize a model's weights: int8 / int4 round-to-nearest or GPTQ, to a folder or a GGUF file",
    "prune": "Prune weights to exact zeros: magnitude, Wanda or SparseGPT, unstructured or N:M (2:4)",
    "export": "Export a model to ONNX (optionally int8/int4 in ONNX Runtime) or GGUF, checked against lmforge",
    "distill": "Distill a teacher into a smaller student: KD / reverse KL / JSD, optionally on-policy",
    "pipeline": "Run several verbs in order in one run directory (skips finished stages; --from STAGE re-runs)",
    "report": "Write a self-contained HTML report of a run or pipeline (curves, evaluations, lineage, configs)",
    "plan": "Plan a run from a model config: parameters, FLOPs, Chinchilla sizing, memory per device (DDP/FSDP/LoRA)",
    "scale": "Run a grid of small pretraining runs and fit the scaling law L(N, D) = E + A/N^a + B/D^b",
    "tune": "Search hyperparameters of any training verb with Optuna (TPE, pruning; workers share one storage)",
}
"""Verb name -> one-line description; verb ``foo-bar`` runs module ``lmforge.stages.foo_bar``."""

_KEYVAL = re.compile(r"^[A-Za-z_][\w.]*=")
_NUMBER = re.compile(r"^-\d*\.?\d+([eE][-+]?\d+)?$")
_BOOLS = {"true", "false", "yes", "no", "on", "off", "True", "False", "Yes", "No", "On", "Off",
          "TRUE", "FALSE", "YES", "NO", "ON", "OFF"}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code: 2 for bad input (config, data or model files), 1 for a runtime
    failure, 130 on Ctrl-C. Errors print as one line; `--debug` (anywhere before `--`) or LMFORGE_DEBUG=1 adds
    the traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    end = args.index("--") if "--" in args else len(args)
    flag = "--debug" in args[:end]
    args = [a for a in args[:end] if a != "--debug"] + args[end:]
    with _debug_env(flag):
        try:
            return _run(args)
        except KeyboardInterrupt:
            return 130
        except Exception as e:  # noqa: BLE001 - every failure ends in one line (and a traceback only on request)
            if debug_requested():
                traceback.print_exc()
            code, line = describe_error(e)
            print(f"error: {line}", file=sys.stderr)
            return code


@contextlib.contextmanager
def _debug_env(on: bool) -> Iterator[None]:
    """LMFORGE_DEBUG=1 while a command given --debug runs (code that reports errors itself, such as pipeline
    stages, reads it), restored afterwards."""
    saved = os.environ.get(DEBUG_ENV)
    if on:
        os.environ[DEBUG_ENV] = "1"
    try:
        yield
    finally:
        if on and saved is None:
            os.environ.pop(DEBUG_ENV, None)
        elif on:
            os.environ[DEBUG_ENV] = saved


def describe_error(e: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) of an error: 2 with the message for bad input, 1 with the exception's type
    and a pointer to `--debug` for anything else."""
    if isinstance(e, INPUT_ERRORS):
        return 2, one_line(str(e) or type(e).__name__)
    text = one_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    return 1, f"{text} (a runtime failure; --debug or {DEBUG_ENV}=1 prints the traceback)"


def _run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"lmforge {_version()}")
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        near = difflib.get_close_matches(verb, list(VERBS), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else "; run 'lmforge --help' for the list"
        raise ConfigError(f"unknown command '{verb}'{hint}")
    stage = importlib.import_module(f"lmforge.stages.{verb.replace('-', '_')}")
    positional = tuple(getattr(stage, "POSITIONAL", ()))
    before_dashdash = rest[: rest.index("--")] if "--" in rest else rest
    if "-h" in before_dashdash or "--help" in before_dashdash:
        print(verb_help(verb, stage.Config, positional))
        return 0
    path, overrides, print_config = parse_args(rest, stage.Config, positional)
    cfg = load_config(stage.Config, path, overrides)
    if print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    try:
        return int(stage.main(cfg) or 0)
    except ConfigError as e:  # a setting found wrong while running: name the file it came from
        if path is not None and str(path) not in str(e):
            raise ConfigError(f"{e} (config {path})") from e
        raise


def parse_args(args: Sequence[str], cls: type, positional: Sequence[str] = ()) -> tuple[str | None, list[str], bool]:
    """Split a verb's arguments into (config file, ``key=value`` overrides, print-config flag)."""
    path: str | None = None
    overrides: list[str] = []
    pos: list[str] = []
    print_config = only_pos = False
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        nxt = args[i] if i < len(args) else None
        if only_pos:
            pos.append(tok)
        elif tok == "--":
            only_pos = True
        elif tok == "--print-config":
            print_config = True
        elif tok in ("--config", "-c"):
            if nxt is None or nxt.startswith("-"):
                raise ConfigError(f"option '{tok}' needs a YAML file {COMMAND_LINE}")
            path, i = nxt, i + 1
        elif tok.startswith("--config="):
            path = tok.partition("=")[2]
        elif tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            key = name.replace("-", "_")
            key += "_" if keyword.iskeyword(key) else ""  # --from sets the field from_
            tp = _flag_type(cls, key)
            if tp is None:  # --no-flag
                overrides.append(f"{key[3:]}=false")
                continue
            if not eq:
                if _is_bool(tp):
                    value = "true"
                    if nxt is not None and nxt in _BOOLS:  # --flag false
                        value, i = nxt, i + 1
                elif nxt is None or nxt.startswith("--"):
                    raise ConfigError(f"option '--{name}' needs a value {COMMAND_LINE}")
                else:
                    value, i = nxt, i + 1
            overrides.append(f"{key}={value}")
        elif _KEYVAL.match(tok):
            overrides.append(tok)
        elif tok.startswith("-") and not _NUMBER.match(tok):
            raise ConfigError(f"unknown option '{tok}' {COMMAND_LINE}; options are written --key VALUE")
        else:
            pos.append(tok)
    if len(pos) > len(positional):
        extra = pos[len(positional)]
        takes = (f"takes {len(positional)} positional argument(s): {', '.join(positional)}"
                 if positional else "takes no positional arguments")
        near = difflib.get_close_matches(extra, [k for k, *_ in iter_fields(cls)], n=1)
        hint = f"; did you mean '--{near[0]} VALUE'?" if near else "; set options as key=value or --key VALUE"
        raise ConfigError(f"unexpected argument '{extra}' {COMMAND_LINE}: this command {takes}{hint}")
    return path, [f"{k}={v}" for k, v in zip(positional, pos)] + overrides, print_config


def _flag_type(cls: type, key: str) -> Any:
    """Type of the field a ``--flag`` names; None for ``--no-<bool field>``; ConfigError if unknown."""
    try:
        return key_type(cls, key)
    except ConfigError:
        if key.startswith("no_"):
            try:
                if _is_bool(key_type(cls, key[3:])):
                    return None
            except ConfigError:
                pass
        raise


def _is_bool(tp: Any) -> bool:
    return tp is bool or set(get_args(tp)) == {bool, type(None)}


def _fmt_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, Path)):
        return str(value) if str(value) else '""'
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(to_dict(value))
    return str(value)


def verb_help(verb: str, cls: type, positional: Sequence[str] = ()) -> str:
    """Help text for one verb: description, usage and a table of every config field."""
    rows = [(key, type_name(tp), _fmt_default(d), doc) for key, tp, d, doc in iter_fields(cls)]
    head = ("key", "type", "default", "description")
    widths = [min(max(len(r[c]) for r in [head, *rows]), 32) for c in range(3)]
    pos = "".join(f"{p.upper()} " for p in positional)
    lines = [
        f"lmforge {verb}: {VERBS.get(verb, '')}", "",
        f"usage: lmforge {verb} {pos}[--config FILE.yaml] [key=value ...] [--key VALUE ...] [--print-config]", "",
        "Each key can be set in the YAML file, as key=value, or as --key VALUE; booleans also as --key / --no-key.",
        "Precedence: defaults < --config file < command line.", "",
    ]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in [head, *rows]]
    return "\n".join(lines)


def overview() -> str:
    """Top-level help: the list of verbs."""
    width = max(map(len, VERBS))
    lines = ["usage: lmforge <command> [args ...]", "", "commands:"]
    lines += [f"  {v.ljust(width)}  {d}" for v, d in VERBS.items()]
    lines += ["", "Run 'lmforge <command> --help' for a command's options; 'lmforge --version' for the version.",
              f"Errors print as one line; add --debug (or set {DEBUG_ENV}=1) to see the traceback."]
    return "\n".join(lines)


def _version() -> str:
    try:
        from .version import __version__
        return __version__
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("lmforge")
        except PackageNotFoundError:
            return "unknown"


if __name__ == "__main__":
    sys.exit(main())
