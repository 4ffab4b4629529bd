"""Command-line flags generated from typed dataclass configs, so flags and config never drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("", "none") else text


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                            skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``cls`` (nested dataclasses get ``--field-subfield``).

    Defaults are left as ``None`` in the namespace so that :func:`dataclass_from_args` can tell
    which flags were given.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ = hints[f.name]
        flag = "--" + (prefix + f.name).replace("_", "-")
        dest = (prefix + f.name).replace("-", "_")
        if dataclasses.is_dataclass(typ):
            add_dataclass_arguments(parser, typ, prefix=f"{prefix}{f.name}-")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        origin = typing.get_origin(typ)
        if typ is bool:
            conv: Any = _parse_bool
        elif origin is tuple:
            conv = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
            default = ",".join(default)
        elif typ in (int, float, str):
            conv = typ
        else:  # str | None
            conv = _optional_str
        parser.add_argument(flag, dest=dest, type=conv, default=None, metavar=type(default).__name__.upper()
                            if default is not None else "STR", help=f"(default: {default})")


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", base: Any = None) -> Any:
    """Build ``cls`` from the flags that were given, the rest from ``base`` or the defaults."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        dest = (prefix + f.name).replace("-", "_")
        if dataclasses.is_dataclass(hints[f.name]):
            sub_base = getattr(base, f.name) if base is not None else None
            values[f.name] = dataclass_from_args(hints[f.name], args, f"{prefix}{f.name}_", sub_base)
            continue
        given = getattr(args, dest, None)
        if given is not None:
            values[f.name] = given
        elif base is not None:
            values[f.name] = getattr(base, f.name)
    return cls(**values)
