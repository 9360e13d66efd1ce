"""Values between the untrusted program and its judge: plain data only, framed on pipes, bounded in size.

A value crosses as JSON with tags for what JSON lacks: None, bool, int, float (nan and infinities included), str and
list as themselves; tuple, dict, set, frozenset, bytes and complex as one-key objects. An instance of a subclass of
one of these (a Counter, a namedtuple, an IntEnum, or an int whose `__eq__` always says yes) crosses as the plain
value it holds, read with the built-in type's own methods (`dict.items(v)`, `int.__index__(v)`, ...), which a
subclass cannot override; any other object is refused. So the judge compares its own built-in values, never an
object the program made.

Self-contained (standard library only): the sandbox child imports it from its own folder.
"""

import json
import os
import struct

__all__ = ["Unsupported", "encode", "decode", "send", "receive"]

MAX_DEPTH = 200


class Unsupported(TypeError):
    """A value that cannot cross (not plain built-in data, nested too deep, or too large)."""


_PLAIN = (  # a subclass instance -> the plain value, through the base type's own C methods
    (int, int.__index__), (float, float.__float__), (str, str.__str__), (bytes, lambda v: bytes.fromhex(bytes.hex(v))),
    (list, lambda v: list(list.__iter__(v))), (tuple, lambda v: tuple(tuple.__iter__(v))),
    (dict, lambda v: dict(dict.items(v))), (frozenset, lambda v: frozenset(frozenset.__iter__(v))),
    (set, lambda v: set(set.__iter__(v))),
    (complex, lambda v: complex(complex.real.__get__(v), complex.imag.__get__(v))),
)


def _enc(v, depth):
    if depth > MAX_DEPTH:
        raise Unsupported(f"value nested deeper than {MAX_DEPTH} levels")
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return v if -2**53 < v < 2**53 else {"i": str(v)}
    if t is float:
        return {"f": repr(v)}
    if t is list:
        return [_enc(x, depth + 1) for x in v]
    if t is tuple:
        return {"t": [_enc(x, depth + 1) for x in v]}
    if t is dict:
        return {"d": [[_enc(k, depth + 1), _enc(x, depth + 1)] for k, x in v.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "fs": [_enc(x, depth + 1) for x in v]}
    if t is bytes:
        return {"b": v.hex()}
    if t is complex:
        return {"c": [repr(v.real), repr(v.imag)]}
    for base, plain in _PLAIN:
        if issubclass(t, base):  # type(v), not isinstance: an object cannot pretend through __class__
            return _enc(plain(v), depth + 1)
    raise Unsupported(f"a value of type {t.__module__}.{t.__qualname__} (only built-in data crosses: None, bool, "
                      f"int, float, complex, str, bytes, list, tuple, dict, set, frozenset)")


def encode(value):
    """The JSON tree of a plain value (for a message field); raises Unsupported for anything else."""
    try:
        return _enc(value, 0)
    except ValueError as e:  # e.g. an int past the digit limit of int -> str
        raise Unsupported(str(e)) from None
    except RecursionError:
        raise Unsupported(f"value nested deeper than {MAX_DEPTH} levels") from None


def _dec(v):
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if not isinstance(v, dict):
        return v  # None, bool, int, str (json gives exact types)
    if len(v) != 1:
        raise Unsupported("malformed value")
    (tag, x), = v.items()
    if tag == "i":
        return int(x)
    if tag == "f":
        return float(x)
    if tag == "t":
        return tuple(_dec(y) for y in x)
    if tag == "d":
        return {_dec(k): _dec(y) for k, y in x}
    if tag == "s":
        return {_dec(y) for y in x}
    if tag == "fs":
        return frozenset(_dec(y) for y in x)
    if tag == "b":
        return bytes.fromhex(x)
    if tag == "c":
        return complex(float(x[0]), float(x[1]))
    raise Unsupported(f"unknown tag {tag!r}")


def decode(tree):
    """The value of `encode`'s tree; raises Unsupported for anything malformed."""
    try:
        return _dec(tree)
    except Unsupported:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
        raise Unsupported(f"malformed value ({type(e).__name__})") from None


def send(fd: int, message: dict) -> None:
    """Write one message (a JSON object of plain fields) with a 4-byte length prefix."""
    data = json.dumps(message, ensure_ascii=True, allow_nan=False).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def receive(fd: int, max_bytes: int) -> dict | None:
    """The next message, or None at end of stream; raises Unsupported for an oversized or malformed one."""
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > max_bytes:
        raise Unsupported(f"a message of {n} bytes (the limit is {max_bytes})")
    data = _read_exactly(fd, n)
    if data is None:
        return None
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):
        raise Unsupported("malformed message") from None
    if not isinstance(message, dict):
        raise Unsupported("malformed message")
    return message
