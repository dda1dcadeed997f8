"""TOML files in and out: `read_toml` (with messages naming the file) and `dump_toml`,
which writes what `tomllib` reads back to an equal dict (Python has no TOML writer)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from rmib.errors import RmibError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def read_toml(path) -> dict:
    """Parse a TOML file.

    Raises:
        RmibError: the file is missing or is not valid TOML (with the parser's reason).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise RmibError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise RmibError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise RmibError(f"{path}: not valid TOML: the file is not UTF-8 text") from None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dump_toml(data: dict) -> str:
    """Write a dict as TOML text that `tomllib.loads` reads back to an equal dict.

    Handles str, int, float (incl. inf and nan), bool, lists (of values or of
    tables) and nested dicts (as `[section]` and `[section.sub]` tables);
    tuples are written as lists and paths as strings. None values in tables
    are left out, as TOML has no null.

    Raises:
        TypeError: a value TOML cannot hold (e.g. None inside a list, an object).
    """
    if not isinstance(data, dict):
        raise TypeError(f"dump_toml needs a dict, got {type(data).__name__}")
    lines: list[str] = []
    _dump_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_table(table: dict, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if v is not None and not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path:
        if lines:
            lines.append("")
        lines.append("[" + ".".join(_key(p) for p in path) + "]")
    for key, value in scalars.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables.items():
        _dump_table(value, [*path, str(key)], lines)


def _key(key) -> str:
    key = str(key)
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, Path)):
        return _string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + ", ".join(items) + " }" if value else "{}"
    if value is None:
        raise TypeError("TOML has no null: None cannot be written inside a list")
    if hasattr(value, "item"):  # NumPy scalars
        return _value(value.item())
    raise TypeError(f"cannot write a {type(value).__name__} as TOML: {value!r}")
