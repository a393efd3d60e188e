"""Every numeric flag of the command line is range-checked where argparse parses it, so a bad value is
refused at once with the flag's name (not a ValueError from inside the command)."""

from __future__ import annotations

import argparse

import pytest

from workbench.cli.main import build_parser, main


def _actions(parser: argparse.ArgumentParser, path: str = "workbench"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_no_numeric_flag_takes_a_bare_int_or_float():
    bare = [f"{path} {'/'.join(a.option_strings)}" for path, a in _actions(build_parser())
            if a.type in (int, float) and not a.choices]
    assert bare == []


BAD_FLAGS = [  # argv, the one message line argparse prints
    (["eval", "grounding", "--model", "m", "--data", "d", "--batch-size", "0"],
     "argument --batch-size: expected a whole number >= 1, not '0'"),
    (["eval", "grounding", "--model", "m", "--data", "d", "--limit", "-3"],
     "argument --limit: expected a whole number >= 1, not '-3'"),
    (["chat", "--model", "m", "--max-new-tokens", "many"], "argument --max-new-tokens: expected a whole number >= 1"),
    (["serve", "--model", "m", "--port", "70000"], "argument --port: expected a whole number >= 0 and <= 65535"),
    (["serve", "--model", "m", "--batch-wait-ms", "nan"], "argument --batch-wait-ms: expected a number >= 0, not 'nan'"),
    (["serve", "--model", "m", "--max-batch", "0"], "argument --max-batch: expected a whole number >= 1"),
    (["inspect", "c.yaml", "--seq-len", "0"], "argument --seq-len: expected a whole number >= 1, not '0'"),
    (["inspect", "c.yaml", "--images-per-sample", "-1"], "argument --images-per-sample: expected a whole number >= 0"),
    (["demo", "--steps", "0"], "argument --steps: expected a whole number >= 1, not '0'"),
    (["data", "preview", "f.jsonl", "-n", "0"], "argument -n: expected a whole number >= 1, not '0'"),
    (["bench", "--grad-accum", "1.5"], "argument --grad-accum: expected a whole number >= 1, not '1.5'"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a[:2]) + " " + a[-2] for a, _ in BAD_FLAGS])
def test_a_bad_numeric_flag_is_refused_with_its_name(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


BENCHES = [("workbench.demo.grpo_bench", ["report", "--seconds", "0"], "--seconds"),
           ("workbench.serve.bench", ["--model", "m", "--clients", "0"], "--clients")]


@pytest.mark.parametrize("module, argv, flag", BENCHES, ids=[b[0] for b in BENCHES])
def test_the_benches_check_their_numbers_too(module, argv, flag, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(module).main(argv)
    assert f"argument {flag}: expected" in capsys.readouterr().err
