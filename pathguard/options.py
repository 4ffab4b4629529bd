"""The one generator of command-line flags and ``PATHGUARD_*`` environment variables from typed configs.

Every field of a config dataclass is a ``--flag`` (``max_batch_size`` -> ``--max-batch-size``; a field of a
nested dataclass ``gate.tau`` -> ``--gate-tau``) and an environment variable ``PATHGUARD_<FIELD>``
(``PATHGUARD_MAX_BATCH_SIZE``, ``PATHGUARD_GATE_TAU``). A flag wins over the environment, which wins over
the default. Nothing is read at import: :func:`config_from` is called inside a command.

A field's ``metadata`` can refine its flag (plain ``dataclasses.field(metadata=...)``, so configs in
``detector`` and ``service`` need nothing from this package):

- ``help``: the help text (else only the default is shown);
- ``flag``: the flag's name when it is not ``--<field>`` (``"--no-balance"`` for ``balance``);
- ``switch``: a bool set by the flag alone, without a value (``--quiet``; with ``flag="--no-x"`` it clears);
- ``parse``: a function from the text to the value (the default handles int, float, str, bool,
  ``str | None`` and comma-separated tuples);
- ``choices``, ``nargs``, ``metavar``: passed to argparse;
- ``required``: the flag must be given (no environment variable then);
- ``positional``: an optional positional argument instead of a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

ENV_PREFIX = "PATHGUARD_"

T = TypeVar("T")


def env_name(name: str) -> str:
    """``PATHGUARD_<NAME>`` of a (possibly nested, ``gate_tau``) field name."""
    return ENV_PREFIX + name.replace("-", "_").upper()


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("", "none") else text


def _tuple_of(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(t.strip()) for t in text.split(",") if t.strip())
        except ValueError:
            kind = {int: "integers", float: "numbers"}.get(item, "values")  # type: ignore[call-overload]
            raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated {kind}, e.g. 1,2,3") from None

    return parse


def parser_of(typ: Any, meta: Mapping[str, Any]) -> Callable[[str], Any]:
    """How the text of a flag or environment variable becomes a value of type ``typ``."""
    if "parse" in meta:
        return meta["parse"]
    if typ is bool:
        return parse_bool
    if typ in (int, float, str):
        return typ
    args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple:
        return _tuple_of(args[0])
    if set(args) == {str, type(None)}:
        return _optional_str
    if type(None) in args and len(args) == 2:  # int | None, float | None
        inner = next(a for a in args if a is not type(None))
        return lambda s: None if s.lower() in ("", "none") else inner(s)
    raise TypeError(f"unsupported config field type {typ!r}")


def _fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dest, field, type) of every leaf field of ``cls``; nested dataclasses are flattened with their name."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out += _fields(typ, f"{prefix}{f.name}_")  # type: ignore[arg-type]
        else:
            out.append((prefix + f.name, f, typ))
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), shown: Mapping[str, Any] | None = None
) -> None:
    """One flag per field of ``cls`` (see the module docstring). Defaults stay ``None`` in the namespace,
    so that :func:`config_from` can tell the flags that were given from those that were not. ``shown``: the
    defaults the help names for some fields (by flattened name) where the command applies its own, as a base
    config handed to :func:`config_from`."""
    shown = shown or {}
    for dest, f, typ in _fields(cls):
        if dest in skip:
            continue
        meta = f.metadata
        text = meta.get("help", "")
        env = "" if meta.get("required") or meta.get("positional") else f"env {env_name(dest)}; "
        default = shown[dest] if dest in shown else _default(f)
        note = f"({env}default: {_shown(default)})" if not meta.get("required") else ""
        help_text = f"{text} {note}".strip()
        if meta.get("positional"):
            parser.add_argument(dest, nargs="?", default=None, help=help_text)
            continue
        flag = meta.get("flag", "--" + dest.replace("_", "-"))
        if meta.get("switch"):
            const = not flag.startswith("--no-")
            parser.add_argument(flag, dest=dest, action="store_const", const=const, default=None, help=help_text)
            continue
        kwargs = {k: meta[k] for k in ("choices", "nargs") if k in meta}
        parser.add_argument(
            flag,
            dest=dest,
            type=parser_of(typ, meta) if "nargs" not in meta else str,
            default=None,
            required=bool(meta.get("required")),
            metavar=meta.get("metavar", dest.upper()),
            help=help_text,
            **kwargs,
        )


def _value(
    dest: str, f: dataclasses.Field, typ: Any, args: argparse.Namespace | None, environ: Mapping[str, str]
) -> Any:
    """The flag's value, else the environment's, else ``dataclasses.MISSING``."""
    given = getattr(args, dest, None) if args is not None else None
    if given is not None:
        return tuple(given) if isinstance(given, list) else given
    if f.metadata.get("required") or f.metadata.get("positional"):
        return dataclasses.MISSING
    raw = environ.get(env_name(dest), "")
    if raw == "":
        return dataclasses.MISSING
    try:
        return parser_of(typ, f.metadata)(raw)
    except (ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{env_name(dest)}={raw!r} is not a valid {typ}") from None


def config_from(
    cls: type[T],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    base: Any = None,
    prefix: str = "",
) -> T:
    """Build ``cls`` from the flags that were given, then ``PATHGUARD_*`` variables, then ``base`` (a
    config read from a file, which then stands in for the environment), then the defaults.

    An empty environment variable counts as unset; a malformed one raises ``ValueError`` naming it. A
    config with a ``validate()`` method is validated.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            sub_base = getattr(base, f.name) if base is not None else None
            values[f.name] = config_from(typ, args, environ, sub_base, f"{prefix}{f.name}_")  # type: ignore[arg-type]
            continue
        given = _value(prefix + f.name, f, typ, args, environ if base is None else {})
        if given is not dataclasses.MISSING:
            values[f.name] = given
        elif base is not None:
            values[f.name] = getattr(base, f.name)
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    return validate() if callable(validate) else cfg


def opt(default: Any, help_text: str = "", **meta: Any) -> Any:
    """A config field with a default and flag metadata (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"help": help_text, **meta})


def switch(help_text: str) -> Any:
    """A bool field set by a bare ``--flag``."""
    return opt(False, help_text, switch=True)


def required(help_text: str, **meta: Any) -> Any:
    """A str field whose flag must be given."""
    return opt("", help_text, required=True, **meta)


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int],
    *configs: type,
    **parser_kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand whose flags are those of ``configs`` (in order) and which runs ``func(args)``."""
    parser = sub.add_parser(name, **parser_kwargs)
    for cls in configs:
        add_config_arguments(parser, cls)
    parser.set_defaults(func=func)
    return parser
