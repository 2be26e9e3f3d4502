"""kava_common.cli: command lines built from config dataclasses."""

from dataclasses import dataclass
from typing import Any

import pytest

from kava_common.cli import parse_settings, setting, settings_parser


@dataclass
class Example:
    name: str = setting("x", "a name")
    steps: int = setting(3, "how many steps")
    rate: float | None = setting(None, "a rate")
    on: bool = setting(True, "switch")
    layers: list[int] | None = setting(None, "layers")
    caches: list[str] = setting(list, "repeatable", flag="--cache", repeat=True)
    mapping: Any = setting("proportional", "JSON or a word", json=True)
    kind: str = setting("a", "one of", choices=("a", "b"))
    hidden: int = setting(1, "not on the command line", cli=False)


def parse(argv):
    return parse_settings(Example, argv, prog="p", description="d")


def test_only_given_settings_come_back_typed():
    assert parse([]) == {}
    got = parse(["--steps", "7", "--rate", "0.5", "--no-on", "--layers", "0,2, 5", "--cache", "a",
                 "--cache", "b", "--mapping", '[0, null, {"3": 0.5}]', "--kind", "b"])
    assert got == {"steps": 7, "rate": 0.5, "on": False, "layers": [0, 2, 5], "caches": ["a", "b"],
                   "mapping": [0, None, {"3": 0.5}], "kind": "b"}
    assert parse(["--mapping", "proportional", "--on"]) == {"mapping": "proportional", "on": True}
    assert Example(**got).hidden == 1


@pytest.mark.parametrize("argv, message", [(["--steps", "2.5"], "invalid int value"),
                                           (["--layers", "0,x"], "comma-separated int"),
                                           (["--mapping", "[0,"], "expected JSON"),
                                           (["--hidden", "2"], "unrecognized arguments: --hidden")])
def test_bad_values_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_comes_from_the_fields():
    text = settings_parser(Example, "p", "d").format_help()
    assert "--steps STEPS" in text and "how many steps (default: 3)" in text
    assert "--on, --no-on" in text and "--cache CACHES" in text and "--kind {a,b}" in text
    assert "--hidden" not in text


def test_choices_are_checked_by_the_config_not_the_parser():
    """So that the config's own check reports every bad setting at once."""
    assert parse(["--kind", "z"]) == {"kind": "z"}


def test_positional_list():
    @dataclass
    class P:
        paths: list[str] = setting(list, "paths", positional=True)
        verify: bool = setting(False, "check")
    assert parse_settings(P, ["a", "b", "--verify"], prog="p", description="d") == {"paths": ["a", "b"], "verify": True}


def test_a_yes_no_setting_named_no_something_is_refused_when_the_parser_is_built():
    import argparse
    # argparse's --no-X form reads as False, so a setting `no_cot` could never be turned on
    ns = argparse.ArgumentParser()
    ns.add_argument("--no-cot", action=argparse.BooleanOptionalAction)
    assert ns.parse_args(["--no-cot"]).no_cot is False

    @dataclass
    class Bad:
        no_cot: bool = setting(False, "answer at once")
    with pytest.raises(TypeError, match="Bad.no_cot: a yes/no setting may not begin with no_"):
        settings_parser(Bad, prog="x", description="d")
