"""Dataclass configs: YAML recipes, dotted command-line overrides, strict typed validation.

A config is a (possibly nested) ``@dataclass`` whose fields each carry a one-line attribute
docstring (a string statement right after the field); those docstrings double as ``--help``.
Precedence is defaults < YAML file < overrides. Errors name the dotted key, the value found,
what was expected and where the value came from (file and line, or the command line).
A section class with a ``SHORTHAND`` class attribute also takes a plain value, meaning that one field
(``parallel: fsdp`` is ``parallel: {dp: fsdp}``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import re
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .atomic import write_text

__all__ = [
    "ConfigError", "load_config", "to_dict", "dump_yaml", "save_config", "config_hash",
    "iter_fields", "field_docs", "key_type", "type_name", "COMMAND_LINE",
]

T = TypeVar("T")
MISSING = dataclasses.MISSING
_NULLS = {"", "~", "null", "Null", "NULL", "None", "none"}
_EXP_FLOAT = re.compile(r"^[-+]?(\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$")  # YAML 1.1 reads 1e-3 as a string
COMMAND_LINE = "on the command line"


class ConfigError(Exception):
    """A config value is unknown, missing, mistyped or invalid; the message says where and why."""


class _Cli:
    """A raw command-line string, parsed only once the target field type is known."""

    def __init__(self, text: str) -> None:
        self.text = text


# ----------------------------------------------------------------------------- introspection

@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (and its dataclass bases): field name -> one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args:
            rest = tuple(a for a in args if a is not type(None))
            return (rest[0] if len(rest) == 1 else Union[rest]), True
    return tp, False


def _is_dc(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    """Short human-readable name of a field type, e.g. ``list[int]``, ``{cosine, constant}``."""
    inner, optional = _unwrap_optional(tp)
    if optional:
        return f"{type_name(inner)} | None"
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "None"
    if tp is Path:
        return "path"
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"tuple[{type_name(args[0])}, ...]"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted key, type, default, doc) for every leaf field; nested dataclasses are expanded."""
    yield from _iter_fields(cls, prefix, None)


def _iter_fields(cls: type, prefix: str, base: Any) -> Iterator[tuple[str, Any, Any, str]]:
    docs, hints = field_docs(cls), _hints(cls)
    for name, f in _fields(cls).items():
        tp = hints[name]
        default = getattr(base, name) if base is not None else _default_of(f)
        inner, _ = _unwrap_optional(tp)
        if _is_dc(inner):
            yield from _iter_fields(inner, f"{prefix}{name}.", default if isinstance(default, inner) else None)
        else:
            yield f"{prefix}{name}", tp, default, docs.get(name, "")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key, sections included."""
    keys = []
    for name in _fields(cls):
        keys.append(prefix + name)
        inner, _ = _unwrap_optional(_hints(cls)[name])
        if _is_dc(inner):
            keys += _all_keys(inner, f"{prefix}{name}.")
    return keys


def _unknown(root: type, level: type, prefix: str, name: str, where: str, rest: str = "") -> ConfigError:
    """Build the 'unknown key' error for ``prefix + name + rest``, suggesting the nearest valid keys."""
    full = prefix + name + rest
    everything = [k for k in _all_keys(root) if not full.startswith(k + ".")]
    leaf = {k: k.rsplit(".", 1)[-1] for k in everything}
    here = [prefix + k + rest for k in difflib.get_close_matches(name, list(_fields(level)), n=1, cutoff=0.6)]
    near = [k for k in here if k in everything] or difflib.get_close_matches(full, everything, n=1, cutoff=0.75)
    if not near:  # right name, wrong section: 'lr' -> 'train.lr'
        close = difflib.get_close_matches(full.rsplit(".", 1)[-1], set(leaf.values()), n=1, cutoff=0.75)
        near = [k for k, v in leaf.items() if v in close][:3]
    msg = f"unknown key '{full}'{where}"
    if near:
        return ConfigError(msg + "; did you mean " + " or ".join(f"'{k}'" for k in near) + "?")
    return ConfigError(msg + "; valid keys here: " + ", ".join(prefix + k for k in _fields(level)))


def key_type(cls: type, key: str, source: str = COMMAND_LINE) -> Any:
    """Type of the field at dotted ``key``; ConfigError (with suggestions) if there is no such key."""
    tp: Any = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        inner, _ = _unwrap_optional(tp)
        prefix = ".".join(parts[:i]) + "." if i else ""
        if _is_dc(inner):
            if part not in _fields(inner):
                rest = "".join("." + p for p in parts[i + 1:])
                raise _unknown(cls, inner, prefix, part, f" {source}", rest)
            tp = _hints(inner)[part]
        elif get_origin(inner) is dict:
            tp = get_args(inner)[1] if get_args(inner) else Any
        elif inner is Any:
            return Any
        else:
            raise ConfigError(f"'{prefix[:-1]}' is a {type_name(tp)}, not a section; cannot set '{key}' {source}")
    return tp


# ----------------------------------------------------------------------------- coercion

def _show(value: Any) -> str:
    text = repr(value)
    return (text[:77] + "...") if len(text) > 80 else text


class _Ctx:
    """Build context: the root config class and where each dotted key's value came from."""

    def __init__(self, root: type) -> None:
        self.root = root
        self.sources: dict[str, str] = {}

    def where(self, key: str) -> str:
        while key:
            if key in self.sources:
                return " " + self.sources[key]
            parent = re.sub(r"(\[\d+\]|\.[^.\[]*)$", "", key)
            key = "" if parent == key else parent
        return ""

    def set_source(self, key: str, source: str) -> None:
        for k in [k for k in self.sources if k.startswith((key + ".", key + "["))]:
            del self.sources[k]
        self.sources[key] = source


def _from_cli(text: str, tp: Any) -> Any:
    """Parse a command-line string guided by the field type (str fields keep the raw text)."""
    inner, optional = _unwrap_optional(tp)
    if optional and text.strip() in _NULLS:
        return None
    if inner in (str, Path) or (get_origin(inner) is Literal and text in get_args(inner)):
        return text
    try:
        node = yaml.compose(text)
        if get_origin(inner) in (list, tuple) and isinstance(node, yaml.ScalarNode) and not node.style:
            node = yaml.compose(f"[{text}]")  # --betas 0.9,0.95
        if node is not None:
            _check_expansion(node, COMMAND_LINE)
    except yaml.YAMLError:
        if get_origin(inner) in (list, tuple):  # e.g. include=[*.py] (YAML would read * as an alias)
            items = text.strip().removeprefix("[").removesuffix("]").split(",")
            return [i.strip().strip("'\"") for i in items if i.strip()]
        return text
    return None if node is None else _from_node(node, tp)


def _from_node(node: yaml.Node, tp: Any) -> Any:
    inner, optional = _unwrap_optional(tp)
    origin, args = get_origin(inner), get_args(inner)
    if isinstance(node, yaml.SequenceNode):
        def elem(i: int) -> Any:
            if origin is tuple and args and args[-1] is not Ellipsis:
                return args[i] if i < len(args) else Any
            return args[0] if origin in (list, tuple) and args else Any
        return [_from_node(n, elem(i)) for i, n in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out = {}
        for k, v in node.value:
            vt = (args[1] if origin is dict and args else
                  _hints(inner).get(k.value, Any) if _is_dc(inner) else Any)
            out[k.value] = _from_node(v, vt)
        return out
    if node.style:  # quoted: a string whatever it looks like
        return node.value
    if optional and node.value in _NULLS:
        return None
    if inner in (str, Path):
        return node.value
    return yaml.safe_load(node.value)


def _coerce(value: Any, tp: Any, key: str, ctx: _Ctx, base: Any = None) -> Any:
    """Check ``value`` against ``tp`` and convert it (int->float, list->tuple, mapping->dataclass)."""
    if isinstance(value, _Cli):
        value = _from_cli(value.text, tp)
    if tp is Any:
        return value

    def bad(expected: str | None = None, extra: str = "") -> ConfigError:
        expected = expected or type_name(tp)
        return ConfigError(f"{key}: expected {expected}, found {_show(value)} "
                           f"({type(value).__name__}){ctx.where(key)}{extra}")

    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is type(None):
            return None
        raise bad()
    if optional:
        return _coerce(value, inner, key, ctx, base)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm, key, ctx, base)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        raise bad("one of " + ", ".join(repr(a) for a in args),
                  f"; did you mean {near[0]!r}?" if near else "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise bad()
    if origin in (list, tuple):
        if isinstance(value, str) and args and _is_dc(args[0]) and getattr(args[0], "SHORTHAND", None):
            value = [value]  # one item given by its SHORTHAND field: check="Say hi."
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"{type_name(tp)} ({len(args)} items)")
            return tuple(_coerce(v, a, f"{key}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise bad()
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", ctx) for k, v in value.items()}
    if _is_dc(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping) and getattr(tp, "SHORTHAND", None):
            value = {tp.SHORTHAND: value}  # a section with a SHORTHAND field takes a scalar for that field
        if not isinstance(value, Mapping):
            raise bad(f"a mapping of {tp.__name__} fields")
        return _build(tp, value, key + ".", ctx, base if isinstance(base, tp) else None)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad()


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, ctx: _Ctx, base: Any = None) -> T:
    """Make ``cls`` from a (nested) mapping of raw values, on top of ``base`` or the class defaults."""
    fields, hints = _fields(cls), _hints(cls)
    for k in data:
        if str(k) not in fields:
            raise _unknown(ctx.root, cls, prefix, str(k), ctx.where(prefix + str(k)))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key, tp = prefix + name, hints[name]
        default = getattr(base, name) if base is not None else _default_of(f)
        if name in data:
            kwargs[name] = _coerce(data[name], tp, key, ctx, default)
        elif default is not MISSING:
            kwargs[name] = default
        elif _is_dc(tp):
            kwargs[name] = _build(tp, {}, key + ".", ctx)
        else:
            raise ConfigError(f"missing required key '{key}' (it has no default)")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{prefix[:-1]}: {e}" if prefix else str(e)) from e


def _invalid(obj: Any, key: str, message: str, ctx: _Ctx | None) -> ConfigError:
    """The ConfigError of a failed ``validate()``: a message starting with one of the object's field names
    ("lr: must be > 0") is about that field, so the error names its dotted key and where its value came from."""
    name, sep, rest = message.partition(": ")
    if sep and name in _fields(type(obj)):
        key, message = (f"{key}.{name}" if key else name), rest
    where = ctx.where(key) if ctx is not None and key else ""
    return ConfigError(f"{key}: {message}{where}" if key else message)


def _validate(obj: Any, key: str, ctx: _Ctx | None = None) -> None:
    """Call ``validate()`` on every dataclass in the tree, children first; a ValueError becomes a ConfigError
    naming the key and where its value came from."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _validate(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name, ctx)
        hook = getattr(obj, "validate", None)
        if callable(hook):
            try:
                hook()
            except ConfigError:
                raise
            except ValueError as e:
                raise _invalid(obj, key, str(e), ctx) from e
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _validate(v, f"{key}[{i}]", ctx)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _validate(v, f"{key}.{k}", ctx)


# ----------------------------------------------------------------------------- loading

MAX_YAML_VALUES = 100_000
"""Most values a config may expand to, aliases counted at every use: a 'billion laughs' file (aliases of aliases,
a few hundred bytes that expand to billions of values) stops with an error instead of filling the memory."""


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; ConfigError naming the file and line of an unreadable or non-UTF-8 file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path} line {line}: byte 0x{raw[e.start]:02x} is not UTF-8 ({e.reason}); expected a "
                          f"UTF-8 text file") from None


def _parse_yaml(text: str, where: str) -> tuple[yaml.Node | None, Any]:
    """(node graph, data) of a YAML document, checked first to expand to at most MAX_YAML_VALUES values; syntax
    errors become one-line ConfigErrors with the line and column."""
    loader = yaml.SafeLoader(text)
    loader.name = where  # marks in YAML syntax errors name the file
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_expansion(node, where)
        return node, loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(f"{where}{at}: invalid YAML: {e.problem}{context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply to read") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, where: str) -> None:
    """ConfigError when the values reachable from `root`, counted at every alias use, exceed MAX_YAML_VALUES; the
    walk stops there, so it costs at most that many steps whatever the aliases."""
    seen: set[int] = set()
    repeated: yaml.Node | None = None
    stack, count = [root], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            anchor = f" (the anchor at line {repeated.start_mark.line + 1} is used again and again)" if repeated else ""
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_YAML_VALUES:,} values through "
                              f"aliases{anchor}; expected a config of at most {MAX_YAML_VALUES:,} values")
        if id(node) in seen and repeated is None:
            repeated = node
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _read_yaml(path: Path, ctx: _Ctx) -> dict[str, Any]:
    """Read a YAML mapping, recording the line of every dotted key in ``ctx.sources``."""
    node, data = _parse_yaml(_read_text(path), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, "
                          f"found {type(data).__name__}")

    def record(n: yaml.Node, key: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                sub = f"{key}.{k.value}" if key else str(k.value)
                ctx.sources[sub] = f"in {path} line {k.start_mark.line + 1}"
                record(v, sub)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                ctx.sources[f"{key}[{i}]"] = f"in {path} line {v.start_mark.line + 1}"
                record(v, f"{key}[{i}]")

    record(node, "")
    return data


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Sequence[str] | Mapping[str, Any] = (), where: str = "in overrides") -> T:
    """Build ``cls`` from its defaults, then a YAML file, then dotted ``key=value`` overrides (command-line
    strings, or a mapping of dotted keys to values, whose errors say `where` they came from)."""
    ctx = _Ctx(cls)
    tree: dict[str, Any] = _read_yaml(Path(path), ctx) if path is not None else {}
    if isinstance(overrides, Mapping):
        pairs = [(k, v, where) for k, v in overrides.items()]
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} {COMMAND_LINE} must look like key=value")
            k, _, v = item.partition("=")
            pairs.append((k.strip(), _Cli(v), COMMAND_LINE))
    for key, value, source in pairs:
        key_type(cls, key, source)
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[last] = value
        ctx.set_source(key, source)
    cfg = _build(cls, tree, "", ctx)
    _validate(cfg, "", ctx)
    return cfg


# ----------------------------------------------------------------------------- saving

def to_dict(cfg: Any) -> Any:
    """Plain data for YAML/JSON: dataclasses -> dicts, Paths -> str, tuples -> lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML, fields in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``dump_yaml(cfg)`` atomically (temp file in the same folder, fsynced, then renamed)."""
    write_text(path, dump_yaml(cfg))


def config_hash(cfg: Any) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of ``to_dict(cfg)``."""
    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
