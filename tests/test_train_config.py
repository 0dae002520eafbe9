"""The training configuration: one owner (`training.config.TrainConfig`), values from a file or
flags checked for type and range with one-line errors naming the key, bounded error text for
hostile files, and paths in a file taken against the file's folder."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from chestxray.cli import build_parser, main
from chestxray.commands.train import config_from_args
from chestxray.errors import ChestXrayError


def _from_file(path: Path, *flags: str):
    return config_from_args(build_parser().parse_args(["train", "--config", str(path), *flags]))


def test_train_config_has_one_owner_with_literal_choices():
    from chestxray.training import config, loop, rundir

    assert loop.TrainConfig is config.TrainConfig
    hints = config.option_hints()
    for name, choices in (
        ("optimizer", {"adam", "adamw", "sgd"}),
        ("schedule", {"plateau", "onecycle", "cosine", "none"}),
        ("uncertain", {"ignore", "ones", "zeros"}),
        ("recipe", set(config.RECIPES)),
    ):
        assert typing.get_origin(hints[name]) is typing.Literal and set(typing.get_args(hints[name])) == choices
    assert config.LEGACY_CONFIG_NAMES is rundir.LEGACY_CONFIG_NAMES


def test_run_config_file_prefers_config_yaml(tmp_path):
    from chestxray.training.config import run_config_file

    assert run_config_file(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert run_config_file(tmp_path) == tmp_path / "config.json"
    (tmp_path / "config.yaml").write_text("options: {}\n")
    assert run_config_file(tmp_path) == tmp_path / "config.yaml"


@pytest.mark.parametrize(
    "line, key",
    [
        ("lr: .nan", "lr"),
        ("lr: -1", "lr"),
        ("batch_size: 0", "batch_size"),
        ("batch_size: -4", "batch_size"),
        ("epochs: 0", "epochs"),
        ("plateau_factor: 5", "plateau_factor"),
        ("workers: -3", "workers"),
        ("plateau_patience: -1", "plateau_patience"),
        ("log_every: -1", "log_every"),
        ("max_steps: -1", "max_steps"),
        ("uncertain: maybe", "uncertain"),
        ("optimizer: lion", "optimizer"),
        ("root: [1, 2]", "root"),
        ("root: [a, [b]]", "root"),
        ("epochs: true", "epochs"),
    ],
)
def test_bad_values_in_a_file_are_one_line_naming_the_key(tmp_path, line, key):
    path = tmp_path / "run.yaml"
    path.write_text(f"root: /data\nout: /tmp/x\n{line}\n")
    with pytest.raises(ChestXrayError) as info:
        _from_file(path)
    msg = str(info.value)
    assert "\n" not in msg and f"--config {path}: {key} must be" in msg, msg


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--workers", "-3"], "--workers"),
        (["--plateau-patience", "-1"], "--plateau-patience"),
    ],
)
def test_bad_flag_values_name_the_flag(tmp_path, flags, key):
    args = build_parser().parse_args(["train", "/data", "--out", str(tmp_path / "r"), *flags])
    with pytest.raises(ChestXrayError, match=f"^{key}: "):
        config_from_args(args)


def test_direct_construction_is_checked_too():
    from chestxray.training.config import TrainConfig

    with pytest.raises(ChestXrayError, match=r"^batch_size must be at least 1, got 0$"):
        TrainConfig(root="/data", out="/tmp/x", batch_size=0)


def test_billion_laughs_is_refused_small_and_fast(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("root: *i")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err) < 400 and len(err.strip().splitlines()) == 1 and "alias" in err, err


def test_long_bad_value_is_echoed_bounded(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: " + "x" * 100_000 + "\n")
    with pytest.raises(ChestXrayError) as info:
        _from_file(path)
    assert len(str(info.value)) < 300 and "epochs must be int" in str(info.value)


def test_paths_in_a_file_are_taken_against_its_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    path = folder / "run.yaml"
    path.write_text("root: [csv:data, nih-copy]\nout: runs/a\ncache: c\n")
    monkeypatch.chdir(tmp_path)
    cfg, _, _ = _from_file(path)
    assert cfg.out == str(folder / "runs" / "a") and cfg.cache == str(folder / "c")
    assert cfg.root == [f"csv:{folder / 'data'}", str(folder / "nih-copy")]
    # A flag still wins, as given.
    cfg, _, _ = _from_file(path, "--out", "elsewhere")
    assert cfg.out == "elsewhere"
    # The run says where it goes (and from which data) before it starts.
    path.write_text("root: nowhere\nout: runs/b\nmodel: resnet18\nweights: none\nfreeze: all\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"from --config {path}: root {folder / 'nowhere'}, out {folder / 'runs' / 'b'}", err
    assert not (folder / "runs").exists()
