"""The command line's bad-input table: every checked input gets one line, exit code 2, fast.

Numeric options are found by introspecting the parser, so an option added later with a
checked type is covered without editing this file.
"""

import argparse
import os
import subprocess
import sys
import time

import pytest

from qfx import cli_parser as cli
from qfx.cli import build_parser, main
from tests.conftest import WIKITEXT

# what each checked type accepts, as (value, accepted)
CASES = {
    cli._positive_int: [("0", False), ("-1", False), ("1.5", False), ("x", False), ("1", True)],
    cli._non_negative_int: [("-1", False), ("x", False), ("0", True)],
    cli._positive_float: [("0", False), ("-0.5", False), ("nan", False), ("x", False), ("0.5", True)],
    cli._non_negative_float: [("-0.5", False), ("x", False), ("0", True)],
}


def _numeric_options():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, sub in subs.choices.items():
        for action in sub._actions:
            if action.type in CASES:
                for value, accepted in CASES[action.type]:
                    yield command, action.option_strings[-1], value, accepted


TABLE = list(_numeric_options())


def test_the_table_covers_every_command_and_the_numeric_options():
    commands = {c for c, *_ in TABLE}
    assert commands == {"quantize", "eval", "generate"}
    options = {o for _, o, *_ in TABLE}
    assert {"--eval-windows", "--seq-len", "--batch-size", "--calib-samples", "--top-p",
            "--max-new-tokens", "--kv-group"} <= options


@pytest.mark.parametrize("option, value", [("--damp", "x"), ("--damp", "2"), ("--spin-lr", "0"), ("--spin-steps", "1.5"),
                                           ("--sq-alpha", "auto"), ("--sink-weight", "nan")])
def test_a_bad_method_setting_is_one_line_naming_the_flag(capsys, option, value):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["quantize", f"{option}={value}"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and option in err and value in err, err


@pytest.mark.parametrize("command, option, value, accepted", TABLE, ids=[f"{c} {o} {v}" for c, o, v, _ in TABLE])
def test_numeric_option(capsys, command, option, value, accepted):
    parser = build_parser()
    extra = ["--prompt", "hi"] if command == "generate" else []
    argv = [command, f"{option}={value}", *extra]
    if accepted:
        parser.parse_args(argv)
        return
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and option in err and value in err, err


def _cli(*argv, env=None):
    """Runs `python -m qfx.cli` in a fresh process: (exit code, stdout, stderr, seconds)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qfx.cli", *map(str, argv)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=300)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["eval", "--model", "/no/such/folder", "--eval", WIKITEXT], {}, "no such folder or file"),
        (["quantize", "--model", "no-such-model", "--quiet"], {"HF_HUB_OFFLINE": "1"}, "hub is not reachable"),
        (["quantize", "--eval", "/no/such.txt", "--quiet"], {}, "/no/such.txt"),
        (["quantize", "--calib", "/no/such.txt", "--method", "gptq"], {}, "/no/such.txt"),
        (["quantize", "--w-group", "-5"], {}, "group size -5"),
        (["quantize", "--seq-len", "0"], {}, "--seq-len"),
        (["generate", "--prompt-file", "/no/prompts.txt"], {}, "/no/prompts.txt"),
    ],
    ids=["missing path", "bare name offline", "missing eval file", "missing calib file", "bad group", "zero seq len",
         "missing prompt file"],
)
def test_bad_input_is_one_line_in_under_five_seconds(argv, env, message):
    code, out, err, seconds = _cli(*argv, env=env)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert seconds < 5, f"{seconds:.1f} s before the message"


def test_inputs_are_checked_before_the_model_loads(capsys, monkeypatch, tmp_path, tiny_hf_dir):
    import qfx.models

    def never(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(qfx.models, "load_hf", never)
    for argv in (["quantize", "--model", tiny_hf_dir, "--eval", tmp_path / "missing.txt"],
                 ["quantize", "--model", tiny_hf_dir, "--w-bits", "9"],
                 ["quantize", "--model", tiny_hf_dir, "--method", "gptq", "--calib", tmp_path / "missing.txt"]):
        assert main([str(a) for a in argv]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_quiet_json_prints_one_line_and_nothing_on_stderr(tmp_path, tiny_hf_dir):
    code, out, err, _ = _cli("quantize", "--model", tiny_hf_dir, "--eval", WIKITEXT, "--eval-windows", 1,
                             "--seq-len", 64, "--output", tmp_path / "q", "--quiet", "--json")
    assert code == 0, err
    assert len(out.splitlines()) == 1 and out.startswith("{")
    assert err == ""
