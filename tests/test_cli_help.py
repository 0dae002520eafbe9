"""`--help` of every subcommand, `chestxray models`, `make run`'s recipe and `make gpu-check`
without a GPU: what a new user reads first."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chestxray.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _options() -> list[tuple[str, argparse.Action]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [
        (name, action)
        for name, command in sub.choices.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction)
    ]


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_every_option_of_every_command_has_help_and_shows_its_default():
    """Each option says what it does, and an option with a default names it with the word
    "default" and the value as the parser holds it (16, 0.1, f1, cpu ...), so --help never
    hides or misstates a default."""
    options = _options()
    assert len({name for name, _ in options}) >= 10 and len(options) > 100
    no_help, no_default = [], []
    for name, action in options:
        label = f"{name} {'/'.join(action.option_strings) or action.dest}"
        text = action.help or ""
        if not text.strip() or text == argparse.SUPPRESS:
            no_help.append(label)
            continue
        default = action.default
        if (
            action.option_strings
            and default is not None
            and default is not False
            and default != []
            and default != argparse.SUPPRESS
            and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        ) and ("default" not in text or _shown(default) not in text):
            no_default.append(f"{label} (default {default!r}): {text[:80]}")
    assert not no_help, f"options without help: {no_help}"
    assert not no_default, f"options whose help does not show their default: {no_default}"


def test_device_help_names_one_default():
    """--device used to say "auto (...)" first and "(default cpu)" last: one default, named once."""
    helps = {name: action.help for name, action in _options() if "--device" in action.option_strings}
    assert {"predict", "evaluate", "train", "serve"} <= helps.keys()
    for name, text in helps.items():
        assert text.count("default") == 1, (name, text)
    assert "cpu (the default)" in helps["predict"] and "auto (the default" in helps["train"]


def test_serve_header_timeout_says_slower_than_what():
    (text,) = [a.help for n, a in _options() if n == "serve" and "--header-timeout-s" in a.option_strings]
    assert "seconds" in text and "(default 10)" in text


def test_models_table_is_aligned():
    """Every name, xrv-densenet121 and timm/<name> included, starts its description in one column."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["models"]) == 0
    lines = out.getvalue().splitlines()
    assert any(line.startswith("xrv-densenet121 ") for line in lines) and lines[-1].startswith("timm/<name>")
    starts = set()
    for line in lines:
        name = line.split(" ", 1)[0]
        starts.add(len(line) - len(line[len(name) :].lstrip(" ")))
    assert len(starts) == 1, lines


def test_make_run_installs_only_the_light_extra():
    """`make run` builds its own venv from the [infer] extra (no torch, no CUDA wheels), refuses
    one that got nvidia-* or torch, and runs the packaged ONNX model with --cam."""
    proc = subprocess.run(
        ["make", "-n", "--no-print-directory", "run", "RUN_VENV=/nonexistent-venv"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        # Inside `make test` the parent's MAKEFLAGS would still print the directory lines.
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
    )
    if proc.returncode != 0 and "No such file" in proc.stderr:
        pytest.skip("make is not installed")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    installs = [line for line in script.splitlines() if "pip install" in line]
    assert installs == ["/nonexistent-venv/bin/pip install -q -e '.[infer]'"]
    assert "nvidia-" in script and "torch=" in script  # the guard on what got installed
    assert ".venv/" not in script and "TORCH_SPEC" not in script
    run = script.strip().splitlines()[-1]
    assert run.startswith("/nonexistent-venv/bin/chestxray predict --backend onnx ") and "--cam out/cam" in run


def test_gpu_check_without_a_gpu_is_one_line(tmp_path):
    """`make gpu-check` on a machine without a CUDA GPU: one line saying so, no traceback,
    nothing written."""
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    for python in (sys.executable, str(tmp_path / "no-such-python")):
        proc = subprocess.run(
            ["bash", "benchmarks/gpu_check.sh"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "PY": python},
        )
        if "gpu-check: skipped" not in proc.stdout:
            pytest.skip("this machine has a CUDA GPU")
        assert proc.returncode == 0 and proc.stderr == "" and len(proc.stdout.splitlines()) == 1, proc.stdout
        assert not (tmp_path / "out").exists()
