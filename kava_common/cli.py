"""Command lines built from config dataclasses: one flag per field, its help from the field.

Every kava entry point (stage 1, stage 2, evaluate, sweep, info, plot) declares its settings as
a dataclass whose fields say their own command line:

    max_steps: int = setting(200, "optimizer steps")                  # --max-steps N
    quantize: bool = setting(True, "4-bit teacher")                     # --quantize / --no-quantize
    layers: list[int] | None = setting(None, "teacher layers")          # --layers 0,2,5
    caches: list[str] = setting(list, "cache folders", flag="--cache", repeat=True)
    layer_map: Any = setting("proportional", "...", json=True)          # --layer-map '[0, null]'

`parse_settings` returns only what the command line gave ({field: value}), so the dataclass
stays the one place that holds defaults and checks them, and a YAML file can sit between the
two (stage 2: defaults < YAML < flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Callable


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
            choices: tuple | None = None, repeat: bool = False, positional: bool = False,
            json: bool = False, metavar: str | None = None, cli: bool = True):
    """A dataclass field with its command-line description. A callable `default` (list, dict)
    is used as the default factory. `repeat`: a list field given by repeating the flag;
    `positional`: a positional argument (a list field takes one or more); `json`: the value is
    parsed as JSON; `cli=False`: a setting of the config object only."""
    meta = {"help": help, "flag": flag, "choices": choices, "repeat": repeat,
            "positional": positional, "json": json, "metavar": metavar, "cli": cli}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap(tp) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), True
    return tp, False


def comma_list(of: Callable) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [of(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {of.__name__} values, got {text!r}")
    parse.__name__ = f"list of {of.__name__}"
    return parse


def _json(text: str):
    """JSON, or a bare word (such as `proportional`) as that string."""
    try:
        return json.loads(text)
    except ValueError:
        if text.isidentifier():
            return text
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r}")


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        value = f.default
    else:
        return ""
    return "" if value in (None, [], "", {}) else f" (default: {value})"


def add_settings(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of dataclass `cls` (except those marked cli=False); nothing is
    filled in for arguments the command line leaves out."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True):
            continue
        tp, _ = _unwrap(hints[f.name])
        kw: dict[str, Any] = {"help": m.get("help", "") + _default_text(f), "default": argparse.SUPPRESS}
        if m.get("choices"):        # shown, not enforced: the dataclass's check reports every problem at once
            kw["metavar"] = "{" + ",".join(map(str, m["choices"])) + "}"
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        elem = (typing.get_args(tp) or (str,))[0] if typing.get_origin(tp) is list else None
        if tp is bool:
            if f.name.startswith("no_"):    # argparse reads any --no-X flag as "false"
                raise TypeError(f"{cls.__name__}.{f.name}: a yes/no setting may not begin with no_ "
                                f"(--{f.name.replace('_', '-')} would set it to False); name what it turns on")
            kw["action"] = argparse.BooleanOptionalAction
        elif m.get("json") or tp is Any:
            kw["type"] = _json
        elif elem is not None and m.get("positional"):
            kw.update(type=elem, nargs="+")
        elif elem is not None and m.get("repeat"):
            kw.update(type=elem, action="append")
        elif elem is not None:
            kw["type"] = comma_list(elem)
        else:
            kw["type"] = tp
        if m.get("positional"):
            kw.pop("default")
            parser.add_argument(f.name, **kw)
        else:
            parser.add_argument(m.get("flag") or "--" + f.name.replace("_", "-"), dest=f.name, **kw)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp) -> tuple[bool, Any]:
    """(whether `value` is a `tp`, the value as a `tp`), converting only where nothing is
    guessed: a whole number to int, a number to float, a numeric string to either (PyYAML
    reads `1e-4` as a string). A bool is never a number and a string never a bool."""
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp in (int, float):
        if isinstance(value, bool):
            return False, value
        if isinstance(value, str):
            try:
                value = float(value.strip()) if tp is float else int(value.strip())
            except ValueError:
                return False, value
        if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
            return False, value
        if tp is int:
            return (float(value).is_integer(), int(value)) if isinstance(value, float) else (True, value)
        return True, float(value)
    if tp is str:
        return isinstance(value, str), value
    if typing.get_origin(tp) is list or tp is list:
        if not isinstance(value, list):
            return False, value
        elem = (typing.get_args(tp) or (Any,))[0]
        pairs = [_coerce(v, elem) for v in value]
        return all(ok for ok, _ in pairs), [v for _, v in pairs]
    return True, value


def coerce_settings(obj) -> list[str]:
    """Check each field of dataclass instance `obj` against its type, converting in place
    where `_coerce` allows; returns one line per field that is not of its type, naming it
    (a float 2.7 for an int, "no" for a bool, NaN for a number, ...)."""
    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp, optional = _unwrap(hints[f.name])
        if value is None:
            if not optional and tp is not Any:
                problems.append(f"{f.name}: expected {_type_name(tp)}, got null")
            continue
        ok, converted = _coerce(value, tp)
        if ok:
            setattr(obj, f.name, converted)
        else:
            problems.append(f"{f.name}: expected {_type_name(tp)}, got {value!r}")
    return problems


def choice_problems(obj) -> list[str]:
    """One line per field of dataclass instance `obj` whose value is not one of the `choices`
    its declaration gives (the one place they are written down)."""
    out = []
    for f in dataclasses.fields(obj):
        choices, value = f.metadata.get("choices"), getattr(obj, f.name)
        if choices and value is not None and value not in choices:
            out.append(f"{f.name} {value!r}: choose one of {', '.join(map(str, choices))}")
    return out


def read_yaml(path) -> object:
    """A YAML file's contents; a file that does not parse is a ValueError naming it and the
    line (not yaml's multi-line report)."""
    import yaml
    from pathlib import Path
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def settings_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_settings(p, cls)
    return p


class Interrupted(Exception):
    """A command stopped by a signal after saving what it saves (and saying so): it exits with
    `exit_code`, 128 + the signal's number, so that a script can tell it from a finished run."""
    exit_code = 130


def command(settings_cls, work: Callable, *, prog: str, description: str, build: Callable | None = None,
            extend: Callable | None = None, interrupted: str = "interrupted"):
    """A kava entry point, `main(argv=None, prog=None) -> int`, of the one shape every command
    has: the settings of dataclass `settings_cls` from the command line (an argparse usage error
    exits 2), built by the dataclass or `build(given)` (a bad setting: one line, exit 1), then
    `work(settings)`, whose int is the exit status (None: 0). What `work` raises: a KavaError,
    ValueError or OSError is one line and exit 1; Ctrl-C prints `interrupted` (what is kept)
    and exits 130; an Interrupted exits with its code."""
    import sys
    from . import KavaError

    def main(argv=None, prog_name: str | None = None) -> int:
        given = parse_settings(settings_cls, argv, prog=prog_name or prog, description=description, extend=extend)
        try:
            settings = build(given) if build is not None else settings_cls(**given)
            bad = choice_problems(settings)
            if bad:
                raise ValueError("; ".join(bad))
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        try:
            status = work(settings)
        except Interrupted as e:
            return e.exit_code
        except KeyboardInterrupt:
            print(f"\n{interrupted}", file=sys.stderr)
            return 130
        except (KavaError, ValueError, OSError) as e:     # OSError: a read-only or missing path, ...
            print(f"error: {e}", file=sys.stderr)
            return 1
        return status or 0
    main.__doc__ = description
    return main


def parse_settings(cls, argv=None, *, prog: str, description: str,
                   extend: Callable[[argparse.ArgumentParser], None] | None = None) -> dict:
    """The settings of dataclass `cls` that `argv` gives, as {field: value}; `extend` may add
    arguments that are not settings (stage 2's --config)."""
    p = settings_parser(cls, prog, description)
    if extend is not None:
        extend(p)
    return vars(p.parse_args(argv))
