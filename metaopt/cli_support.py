"""What both command lines (``python -m meta_train``, ``python -m meta_test``) share.

- ``KEY=VALUE`` options (``--option``, ``--source-option``, ``--task-option``): VALUE is a
  TOML value (``3``, ``0.1``, ``true``, ``"text"``, ``[1, 2]``, ``{truncate = 20}``); a bare
  word (``mse``, ``runs/x``) is a string and ``True``/``False`` in any case are booleans.
- typed values with ranges: :func:`check_int`, :func:`int_arg`, :func:`float_arg`,
  :func:`check_device`, :func:`parse_dtype`, and :func:`check_types` for the fields of a
  config dataclass or the keyword options of a factory;
- output folders: :func:`check_output_dir` (not a file, not under one, writable);
- ``--import MODULE`` (:func:`import_modules`): user modules that register tasks, families,
  objectives, engines, learners or specs, imported before any name is resolved;
- error messages: :func:`one_line`, an exception's message as the one line a CLI prints.

Every failure is a one-line ``ValueError`` (``argparse.ArgumentTypeError`` for argparse
types) naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import tempfile
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_COUNT",
    "MAX_SEED",
    "VALUE_SYNTAX",
    "check_device",
    "check_int",
    "check_output_dir",
    "check_types",
    "float_arg",
    "import_modules",
    "imports_in",
    "int_arg",
    "one_line",
    "parse_dtype",
    "parse_key_value",
    "parse_options",
    "parse_value",
    "typed_task_options",
]

#: largest step / iteration count accepted (a loss buffer of this many float64 is 800 MB)
MAX_COUNT = 10**8
#: largest seed (NumPy's global seed is 32-bit)
MAX_SEED = 2**32 - 1
#: how every KEY=VALUE flag reads VALUE (quoted in both CLIs' --help)
VALUE_SYNTAX = (
    'VALUE is TOML: 3, 0.1, true/false, "text", [1, 2], {truncate = 20}; a bare word is a string'
)
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.+\-:/]*")
_DTYPES = ("float32", "float64", "float16", "bfloat16")


def one_line(err: BaseException) -> str:
    """``err``'s message with its whitespace runs (newlines included) as single spaces; its
    type's name when the message is empty."""
    return " ".join(str(err).split()) or type(err).__name__


# --- KEY=VALUE --------------------------------------------------------------------------
def parse_value(raw: str, what: str = "value") -> Any:
    """``raw`` as a TOML value; a bare word is a string, ``True``/``False`` booleans.

    Raises:
        ValueError: ``raw`` is neither a TOML value nor a bare word (e.g. ``{"a": 1}``,
            whose TOML spelling is ``{a = 1}``).
    """
    text = raw.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        doc = None
    if doc is not None and set(doc) == {"v"}:
        return doc["v"]
    if _BARE_WORD.fullmatch(text):
        return text
    raise ValueError(f"{what}={raw!r}: is not a value; {VALUE_SYNTAX}")


def parse_key_value(text: str, flag: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> ``(key with - as _, parsed VALUE)``."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise ValueError(f"{flag} {text!r}: write KEY=VALUE ({VALUE_SYNTAX})")
    return key, parse_value(raw, f"{flag} {key}")


def parse_options(items: Sequence[str], flag: str) -> dict[str, Any]:
    """Several ``KEY=VALUE`` items; a key given twice is an error."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_key_value(item, flag)
        if key in out:
            raise ValueError(f"{flag} {key}: given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


# --- numbers, devices, dtypes -------------------------------------------------------------
def check_int(name: str, value: object, low: int, high: int = MAX_COUNT) -> int:
    """``value`` if it is an integer (not a bool) in ``[low, high]``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be an integer in [{low}, {high}]")
    return value


def int_arg(low: int, high: int = MAX_COUNT) -> Callable[[str], int]:
    """An argparse ``type``: a decimal integer in ``[low, high]`` (``1e3`` is refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: must be an integer in [{low}, {high}]")
        return value

    return parse


def float_arg(*, positive: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite float (``> 0`` when ``positive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (positive and value <= 0):
            allowed = "a positive finite number" if positive else "a finite number"
            raise argparse.ArgumentTypeError(f"{text!r}: must be {allowed}")
        return value

    return parse


def check_device(value: object, name: str = "device") -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` naming a GPU that is visible here."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{name}={value!r}: must be 'cpu', 'cuda' or 'cuda:N'")
    if value != "cpu":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}={value!r}: no CUDA GPU is visible here; use 'cpu'")
        if match.group(1) is not None and int(match.group(1)) >= count:
            raise ValueError(f"{name}={value!r}: {count} GPU(s) visible, cuda:0..cuda:{count - 1}")
    return str(value)


def parse_dtype(value: object, name: str = "dtype") -> Any:
    """A ``torch.dtype`` from ``"float32"``, ``"torch.float64"``, ... (or a dtype itself)."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    key = value.removeprefix("torch.") if isinstance(value, str) else None
    if key not in _DTYPES:
        raise ValueError(f"{name}={value!r}: must be one of {list(_DTYPES)}")
    return getattr(torch, key)


def typed_task_options(options: Mapping[str, Any], flag: str) -> dict[str, Any]:
    """Task/suite/family options with ``dtype`` as a ``torch.dtype`` and ``device`` checked."""
    out = dict(options)
    if "dtype" in out:
        out["dtype"] = parse_dtype(out["dtype"], f"{flag} dtype")
    if "device" in out:
        out["device"] = check_device(out["device"], f"{flag} device")
    return out


# --- output folders ------------------------------------------------------------------------
def check_output_dir(
    path: str | os.PathLike[str], name: str = "out", *, beside: bool = False
) -> Path:
    """``path`` if it is a directory, or can be created as one, that this process can write
    in; ``ValueError`` if it is a file, lies under a regular file, or is not writable (found
    by creating and removing a temporary directory where the outputs will go: in ``path``,
    or with ``beside=True`` in its parent, for outputs renamed onto ``path`` as a whole)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}={str(path)!r}: exists and is not a directory")
    where = path.absolute().parent if beside else path.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise ValueError(f"{name}={str(path)!r}: lies under {str(where)!r}, a regular file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe.", dir=where))
    except OSError as err:
        raise ValueError(
            f"{name}={str(path)!r}: cannot write in {str(where)!r} ({err.strerror})"
        ) from None
    return path


# --- annotated types ----------------------------------------------------------------------
def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has type ``hint`` (bool is not int; int is a float; unknown: yes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    base = origin or hint
    if base in (dict, Mapping):
        return isinstance(value, Mapping)
    if base in (list, tuple, Sequence):
        return isinstance(value, list | tuple)
    if isinstance(base, type) and base.__module__ == "builtins":
        return isinstance(value, base)
    return True  # a library type (torch.dtype, Callable, ...): its own code checks it


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is bool:
        return "true or false"
    return getattr(hint, "__name__", None) or str(hint)


def check_types(target: Any, values: Mapping[str, Any] | None = None) -> None:
    """Check values against annotations: a dataclass instance's fields (``values=None``),
    or ``values`` against the keyword parameters of the callable ``target``.

    Raises:
        ValueError: the first value whose type is not its annotation's (one line).
    """
    if values is not None and isinstance(target, type):
        target = target.__init__  # a class factory: its constructor's parameters
    try:
        hints = typing.get_type_hints(target if values is not None else type(target))
    except Exception:  # an annotation that cannot be resolved here is not checked
        return
    if values is None:
        values = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
    for name, value in values.items():
        if name in hints and not _matches(value, hints[name]):
            raise ValueError(f"{name}={value!r}: must be {_describe(hints[name])}")


# --- --import MODULE ---------------------------------------------------------------------
def imports_in(argv: Sequence[str]) -> list[str]:
    """The ``--import`` values in ``argv`` (read before the full parser is built)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    known, _ = pre.parse_known_args(list(argv))
    return list(known.imports)


def import_modules(names: Sequence[str]) -> None:
    """Import each module (a dotted name, or a ``.py`` file path) for its registrations.

    Raises:
        ValueError: a module cannot be imported or raises while importing (one line).
    """
    for name in names:
        try:
            if name.endswith(".py") or os.sep in name:
                _import_file(name)
            else:
                importlib.import_module(name)
        except (Exception, SystemExit) as err:
            raise ValueError(
                f"--import {name!r}: cannot be imported ({type(err).__name__}: {one_line(err)})"
            ) from None


def _import_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file {path!r}")
    module_name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path!r} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
