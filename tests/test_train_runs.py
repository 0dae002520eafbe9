"""Training runs one can watch, compare and reproduce, and the run folder's rules under bad
input and faults. Tiny resnet18 runs at 32 px on the repository's NIH subset; one run is
shared by the tests of its outputs."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from chestxray.cli import build_parser, main
from chestxray.commands.train import config_from_args
from chestxray.errors import ChestXrayError, OutputError
from chestxray.training.loop import TrainConfig, Trainer

TINY = ["--model", "resnet18", "--image-size", "32", "--batch-size", "16", "--val-fraction", "0.3", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, mini_root):
    from chestxray.data.cache import prepare_cache
    from chestxray.data.index import load_nih

    folder = tmp_path_factory.mktemp("cache")
    prepare_cache(list(load_nih(mini_root).iter_paths()), folder, 32, workers=1, progress=False)
    return folder


def _train(mini_root, cache_dir, out, *extra: str) -> tuple[int, str]:
    """`chestxray train` through main(), with stderr captured (not a terminal)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", str(mini_root), "--out", str(out), *TINY, "--cache", str(cache_dir), *extra])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mini_root, cache_dir):
    """The from-scratch recipe, shortened by flags that override it: 2 epochs of 2 steps."""
    out = tmp_path_factory.mktemp("runs") / "a"
    rc, err = _train(
        mini_root, cache_dir, out, "--recipe", "scratch", "--epochs", "2", "--max-steps", "2", "--log-every", "1"
    )
    assert rc == 0, err
    return out, err


@pytest.mark.slow
def test_progress_lines_without_a_terminal(run_dir):
    _, err = run_dir
    lines = [line for line in err.splitlines() if line.startswith("epoch 1/2  step")]
    assert [line.split()[3] for line in lines] == ["1/2", "2/2"]
    assert "img/s" in lines[0] and "ETA" in lines[0]


@pytest.mark.slow
def test_tensorboard_events_read_back(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run_dir
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/auroc_macro", "train/lr", "epoch/images_per_second"} <= set(scalars)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val_loss = [(e.step, e.value) for e in acc.Scalars("val/loss")]
    assert [s for s, _ in val_loss] == [1, 2]
    assert [v for _, v in val_loss] == pytest.approx([r["val_loss"] for r in log], rel=1e-6)
    assert [e.step for e in acc.Scalars("train/loss_step")] == [1, 2, 3, 4]
    assert any(t.startswith("val_auroc/") for t in scalars)
    best = 1 + int(np.argmin([r["val_loss"] for r in log]))
    roc = acc.Images("val/roc_curves")
    assert [e.step for e in roc] == [best] and roc[0].width > 400


@pytest.mark.slow
def test_curves_summary_and_config_in_the_run_folder(run_dir, mini_root):
    out, _ = run_dir
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = (out / "summary.md").read_text()
    assert "Status: **finished**" in summary and "Best epoch (lowest validation loss)" in summary
    assert "| Atelectasis |" in summary  # validation metrics of the kept weights
    record = yaml.safe_load((out / "config.yaml").read_text())
    opts = record["options"]
    # --recipe scratch, with --epochs 2 overriding its 30 and the rest kept.
    assert (opts["recipe"], opts["optimizer"], opts["schedule"], opts["weights"], opts["freeze"], opts["epochs"]) == (
        "scratch",
        "adamw",
        "onecycle",
        "none",
        "all",
        2,
    )
    assert opts["image_size"] == 32 and Path(opts["root"]).is_absolute()
    assert record["environment"]["torch"] == str(torch.__version__) and record["environment"]["chestxray"]
    import hashlib

    labels = mini_root / "Data_Entry_2017.csv"
    assert record["data"][0]["sha256"][labels.name] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert record["data"][0]["images_found"] == len(list((mini_root / "images").glob("*.png")))


@pytest.mark.slow
def test_rerun_from_config_yaml_gives_identical_weights(run_dir, tmp_path):
    out, _ = run_dir
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "b")])
    assert rc == 0, err.getvalue()
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "config.yaml").read_text().split("environment:")[0] == (
        (out / "config.yaml").read_text().split("environment:")[0]
    )


SAMPLE_ROOT = os.environ.get("CHESTXRAY_SAMPLE_ROOT")


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE_ROOT, reason="set CHESTXRAY_SAMPLE_ROOT to the 1,350-image NIH sample")
def test_sample_run_writes_events_curves_summary_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(
            [
                "train",
                str(SAMPLE_ROOT),
                "--out",
                str(out),
                "--model",
                "resnet18",
                "--image-size",
                "32",
                "--recipe",
                "scratch",
                "--epochs",
                "2",
                "--max-steps",
                "3",
                "--log-every",
                "1",
                "--device",
                "cpu",
                "--cache",
                str(tmp_path / "cache"),
                "--workers",
                "2",
            ]
        )
    assert rc == 0, err.getvalue()[-2000:]
    assert "epoch 2/2  step 3/3" in err.getvalue()
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/auroc_macro")] == [1, 2]
    assert (out / "curves.png").stat().st_size > 10_000 and "finished" in (out / "summary.md").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["data"][0]["images_found"] == 1_350


def test_flags_override_a_config_file(tmp_path, mini_root):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"root: {mini_root}\nout: {tmp_path / 'x'}\nmodel: resnet18\nepochs: 3\nlr: 1e-3\n"
        "image-size: 48\nrecipe: scratch\n"
    )
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--epochs", "1"])
    cfg, resume, overwrite = config_from_args(args)
    assert (cfg.epochs, cfg.lr, cfg.image_size, cfg.model, cfg.optimizer) == (1, 0.001, 48, "resnet18", "adamw")
    assert cfg.out == str(tmp_path / "x") and not resume and not overwrite
    # An explicit flag equal to the default still wins over the file.
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--recipe", "seed", "--lr", "1e-5"])
    cfg, _, _ = config_from_args(args)
    assert (cfg.recipe, cfg.lr, cfg.optimizer, cfg.epochs) == ("seed", 1e-5, "adam", 3)
    cfg_file.write_text("epochs: five\n")
    with pytest.raises(ChestXrayError, match=r"run.yaml: epochs must be int, got 'five'"):
        config_from_args(build_parser().parse_args(["train", "--config", str(cfg_file)]))
    cfg_file.write_text("epoch: 3\n")
    with pytest.raises(ChestXrayError, match=r"unknown option 'epoch'"):
        config_from_args(build_parser().parse_args(["train", "--config", str(cfg_file)]))


def _legacy_run(folder: Path, mini_root: Path) -> Path:
    """A run folder as runs made before config.yaml left it: a flat config.json."""
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"root": str(mini_root), "out": str(folder), "model": "resnet50", "image_size": 224, "epochs": 3})
    )
    rows = [
        {
            "epoch": e,
            "train_loss": 0.5 - e / 10,
            "val_loss": v,
            "val_mean_auroc": a,
            "val_elementwise_accuracy": 0.9,
            "lr": 1e-5,
            "seconds": 10.0,
            "images_per_second": 5.0,
        }
        for e, v, a in ((1, 0.4, 0.6), (2, 0.3, 0.65), (3, 0.35, 0.7))
    ]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.slow
def test_runs_table_csv_json_and_plot(run_dir, tmp_path, mini_root, capsys):
    out, _ = run_dir
    legacy = _legacy_run(tmp_path / "old", mini_root)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(out / "config.yaml", partial / "config.yaml")
    (partial / "log.jsonl").write_text((out / "log.jsonl").read_text().splitlines()[0] + "\n")
    assert main(["runs", str(out), str(tmp_path), "--plot", str(tmp_path / "cmp.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["run", "status", "model", "recipe"] and len(table) == 1 + 3 + 1  # + "wrote"
    by_run = {line.split()[0]: line.split() for line in table[1:4]}
    assert by_run[str(legacy)][1:3] == ["partial", "resnet50"] and "3/3" in by_run[str(legacy)]
    # kept epoch = lowest validation loss (epoch 2, AUROC 0.65); best over epochs 0.7
    assert by_run[str(legacy)][8:10] == ["0.6500", "0.7000"]
    assert by_run[str(out)][1] == "finished" and by_run[str(partial)][6] == "1/2"
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["runs", str(legacy), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["best_epoch"] == 2 and rows[0]["time_s"] == 30.0 and rows[0]["data"] == mini_root.name
    assert main(["runs", str(legacy), "--format", "csv", "--out", str(tmp_path / "runs.csv")]) == 0
    assert (tmp_path / "runs.csv").read_text().splitlines()[0].startswith("run,status,model,recipe,data")
    # --config accepts an old run's config.json
    args = build_parser().parse_args(["train", "--config", str(legacy / "config.json"), "--out", str(tmp_path / "n")])
    assert config_from_args(args)[0].model == "resnet50"
    assert main(["runs", str(tmp_path / "partial" / "nothing")]) == 2


# ---- --weights none with frozen random layers ------------------------------
def test_weights_none_with_seed_freeze_is_refused(tmp_path, mini_root, cache_dir, capsys):
    rc = main(
        [
            "train",
            str(mini_root),
            "--out",
            str(tmp_path / "r"),
            *TINY,
            "--cache",
            str(cache_dir),
            "--weights",
            "none",
            "--epochs",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--recipe scratch" in err and "--freeze seed" in err
    assert not (tmp_path / "r").exists()


# ---- no silent overwrite; no empty folder after an early error ----------------------
@pytest.mark.slow
def test_finished_run_is_not_overwritten(run_dir, tmp_path, mini_root, cache_dir, capsys):
    out, _ = run_dir
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, err = _train(mini_root, cache_dir, out, "--recipe", "scratch", "--epochs", "1")
    assert rc == 2 and "already holds a training run" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # An early error (unknown model) leaves no folder behind.
    rc = main(
        [
            "train",
            str(mini_root),
            "--out",
            str(tmp_path / "new"),
            "--model",
            "resnet51",
            "--weights",
            "none",
            "--freeze",
            "all",
        ]
    )
    assert rc == 2 and not (tmp_path / "new").exists()


@pytest.mark.slow
def test_overwrite_replaces_a_run(run_dir, tmp_path, mini_root, cache_dir):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("config.yaml", "log.jsonl"):  # an unfinished run is still a run
        shutil.copy(run_dir[0] / name, out / name)
    args = ("--weights", "none", "--freeze", "all", "--epochs", "1", "--max-steps", "1", "--lr", "1e-4")
    assert _train(mini_root, cache_dir, out, *args)[0] == 2
    rc, err = _train(mini_root, cache_dir, out, *args, "--overwrite")
    assert rc == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["options"]["lr"] == 1e-4
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


# ---- a broken checkpoint.pt on --resume --------------------------------------------
@pytest.mark.slow
def test_broken_checkpoint_is_one_clear_line(run_dir, tmp_path, capsys):
    out, _ = run_dir
    good = (out / "checkpoint.pt").read_bytes()

    class Evil:  # a foreign pickle: weights_only refuses it, and so must the message
        def __reduce__(self):
            return (os.getcwd, ())

    import pickle

    for name, data in (
        ("empty", b""),
        ("truncated", good[: len(good) // 3]),
        ("random", np.random.default_rng(0).bytes(4096)),
        ("pickle", pickle.dumps(Evil())),
    ):
        run = tmp_path / name
        run.mkdir()
        shutil.copy(out / "config.yaml", run / "config.yaml")
        (run / "checkpoint.pt").write_bytes(data)
        assert main(["train", "--out", str(run), "--resume"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(run / "checkpoint.pt") in err, (name, err)
        assert "weights_only" not in err and "Traceback" not in err, (name, err)


# ---- unwritable --out, --out a file, a full disk -----------------------------------
def test_out_that_is_a_file_or_unwritable(tmp_path, mini_root, cache_dir):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        rc, err = _train(mini_root, cache_dir, out, "--weights", "none", "--freeze", "all", "--epochs", "1")
        assert rc == 2 and "is a file, not a folder" in err and "Traceback" not in err
    locked = Path("/sys/chestxray-test-run")  # sysfs refuses new folders, even to root
    try:
        locked.mkdir()
    except OSError:
        pass
    else:
        locked.rmdir()
        pytest.skip(f"{locked.parent} is writable here")
    rc, err = _train(mini_root, cache_dir, locked, "--weights", "none", "--freeze", "all", "--epochs", "1")
    assert rc == 2 and f"cannot write {locked}" in err and "Traceback" not in err


@pytest.mark.slow
def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, mini_root, cache_dir, monkeypatch, capsys):
    real_save = torch.save
    calls = []

    def save_then_fill_disk(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) < 2:
            return real_save(obj, f, *a, **kw)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")  # what a full disk leaves mid-write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill_disk)
    out = tmp_path / "r"
    rc, err = _train(
        mini_root, cache_dir, out, "--weights", "none", "--freeze", "all", "--epochs", "2", "--max-steps", "1"
    )
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"chestxray train: error: cannot write {out / 'checkpoint.pt'}: no space left on the device"
    )
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # epoch 1's, whole
    assert state["epoch"] == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files left


# ---- the model's own input size unless --image-size ---------------------------------
def test_image_size_defaults_to_the_models_own(tmp_path, mini_root):
    base = dict(root=str(mini_root), out=str(tmp_path), weights="none", freeze="all", device="cpu")
    assert TrainConfig(**base).image_size is None
    assert Trainer(TrainConfig(model="resnet18", **base)).cfg.image_size == 224
    assert Trainer(TrainConfig(model="resnet18", image_size=64, **base)).cfg.image_size == 64
    pytest.importorskip("timm")
    assert Trainer(TrainConfig(model="timm/resnet10t", **base)).cfg.image_size == 176  # timm's pretrained_cfg


def test_a_failed_write_is_an_output_error_and_leaves_the_old_file(tmp_path):
    """Callers can tell a write failure (OutputError, with the reason) from other errors,
    which pass through unchanged; either way the previous file stays and no temp file is left."""
    from chestxray.training.rundir import save_atomically

    target = tmp_path / "best.safetensors"
    target.write_bytes(b"old")

    def fill_disk(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    def bug(path: Path) -> None:
        raise ValueError("not a write failure")

    with pytest.raises(OutputError, match=f"cannot write {target}: no space left on the device"):
        save_atomically(target, fill_disk)
    with pytest.raises(ValueError, match="not a write failure"):
        save_atomically(target, bug)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [target.name]


# ---- checkpoints torch can read whose contents are wrong; --weights FILE; a full disk ----------
def _wrong_checkpoints(good: dict) -> dict[str, dict]:
    first = next(iter(good["model"]))
    moments = {
        k: {**v, **{m: torch.zeros(3, 3, 3) for m in v if torch.is_tensor(v[m]) and v[m].ndim}}
        for k, v in good["optimizer"]["state"].items()
    }
    return {
        "tensor shape": {**good, "model": {**good["model"], first: torch.zeros(3)}},
        "epoch": {**good, "epoch": "x"},
        "optimizer groups": {**good, "optimizer": {"state": {}, "param_groups": []}},
        "optimizer moments": {**good, "optimizer": {**good["optimizer"], "state": moments}},
        "scheduler": {**good, "scheduler": {"last_epoch": "x"}},
        "best_loss": {**good, "best_loss": "x"},
        "model list": {**good, "model": [1, 2, 3]},
        "args dict": {**good, "args": {"model": "resnet18"}},
        "history": {**good, "history": "not json"},
    }


@pytest.mark.slow
def test_wrong_content_checkpoints_are_one_line(run_dir, tmp_path, capsys):
    out, _ = run_dir
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    for name, state in _wrong_checkpoints(good).items():
        run = tmp_path / name.replace(" ", "_")
        run.mkdir()
        shutil.copy(out / "config.yaml", run / "config.yaml")
        torch.save(state, run / "checkpoint.pt")
        assert main(["train", "--out", str(run), "--resume", "--epochs", "3"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(run / "checkpoint.pt") in err, (name, err)
        assert "Traceback" not in err and len(err) < 500, (name, err)


def test_weights_file_that_is_not_weights(tmp_path, mini_root, cache_dir):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    import pickle

    for name, data in (
        ("text.pth", b"hello"),
        ("pickle.pth", pickle.dumps(Evil())),
        ("bad.safetensors", b"x" * 64),
        ("list.pth", None),
    ):
        path = tmp_path / name
        if data is None:
            torch.save([torch.zeros(2)], path)
        else:
            path.write_bytes(data)
        rc, err = _train(
            mini_root, cache_dir, tmp_path / f"run-{name}", "--weights", str(path), "--freeze", "all", "--epochs", "1"
        )
        last = err.strip().splitlines()[-1]
        assert rc == 2 and f"--weights {path}: not a state dict" in last, (name, err)
        assert "weights_only" not in err and "Traceback" not in err, (name, err)


def test_full_disk_writing_best_weights_is_one_line(tmp_path, mini_root, cache_dir, monkeypatch):
    import safetensors
    import safetensors.torch

    def full(*a, **kw):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "r"
    rc, err = _train(
        mini_root, cache_dir, out, "--weights", "none", "--freeze", "all", "--epochs", "1", "--max-steps", "1"
    )
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"chestxray train: error: cannot write {out / 'best.safetensors'}: no space left on the device"
    ), err


def test_runs_lists_a_broken_run_as_broken(tmp_path, mini_root, capsys):
    good = _legacy_run(tmp_path / "good", mini_root)
    broken = _legacy_run(tmp_path / "broken", mini_root)
    (broken / "config.json").unlink()
    (broken / "config.yaml").write_text("options: [unclosed\n")
    odd = _legacy_run(tmp_path / "odd", mini_root)
    (odd / "log.jsonl").write_text('{"epoch": 1}\n')
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:4]}
    assert rows == {
        str(good): "finished" if (good / "model.safetensors").is_file() else "partial",
        str(broken): "broken",
        str(odd): "broken",
    }, out
    assert f"{broken}: broken: {broken / 'config.yaml'}: not valid YAML (line 2)" in out, out
    assert main(["runs", str(tmp_path), "--format", "json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[str(broken)]["status"] == "broken" and "not valid YAML" in rows[str(broken)]["problem"]
    assert rows[str(good)]["epochs"] == "3/3"


def test_a_foreign_pickle_gives_no_torch_warning_before_the_one_line(tmp_path, recwarn):
    """torch warns about a pickle protocol it did not write; the user sees only our one line."""
    import pickle

    from chestxray.models.registry import _load_backbone_file, get_spec
    from chestxray.training.rundir import read_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "pickle.pth"
    path.write_bytes(pickle.dumps(Evil(), protocol=4))
    with pytest.raises(ChestXrayError, match="not a state dict"):
        _load_backbone_file(torch.nn.Identity(), path, get_spec("resnet18"))  # refused before it is touched
    with pytest.raises(ChestXrayError, match="not a readable chestxray checkpoint"):
        read_checkpoint(path, "cpu")
    assert [str(w.message) for w in recwarn] == []
