"""Training on the repository's real NIH subset at 32 px with resnet18 (fast on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chestxray.cli import main
from chestxray.data.index import load_nih
from chestxray.errors import BundleError, ChestXrayError, WeightsUnavailableError
from chestxray.labels import FINDINGS
from chestxray.models.bundle import BundleMeta, load_bundle, read_bundle_meta, save_bundle
from chestxray.models.registry import create_model
from chestxray.training.loop import TrainConfig, Trainer, train


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, mini_root):
    from chestxray.data.cache import prepare_cache

    folder = tmp_path_factory.mktemp("cache")
    index = load_nih(mini_root)
    prepare_cache(list(index.iter_paths()), folder, 32, workers=1, progress=False)
    return folder


def _cfg(mini_root, out, cache_dir, **kw):
    base = dict(
        root=str(mini_root),
        out=str(out),
        model="resnet18",
        weights="none",
        freeze="all",
        epochs=2,
        batch_size=16,
        lr=1e-3,
        image_size=32,
        cache=str(cache_dir),
        device="cpu",
        val_fraction=0.3,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_loss_falls_on_training_data(tmp_path, mini_root, cache_dir):
    trainer = Trainer(_cfg(mini_root, tmp_path, cache_dir, epochs=6, augment="none"))
    trainer.run()
    losses = [h["train_loss"] for h in trainer.history]
    assert losses[-1] < losses[0] * 0.8, losses
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert {"train_loss", "val_loss", "val_mean_auroc", "val_elementwise_accuracy"} <= set(rows[0])
    meta = read_bundle_meta(tmp_path / "model.safetensors")
    assert meta.labels == list(FINDINGS)
    assert all(0.0 <= t <= 1.0 for t in meta.thresholds)
    assert meta.training["best_epoch"] == 1 + int(np.argmin([r["val_loss"] for r in rows]))
    assert meta.preprocessing.size == 32
    assert "validation" in meta.metrics and meta.metrics["validation"]["per_class"]["Atelectasis"]["threshold"] >= 0
    # The end of training fits a calibrator, an operating point and the input check.
    assert meta.calibration["method"] == "temperature" and meta.operating_point["policy"] == "f1"
    assert [p["layer"] for p in meta.input_check["parts"]] == ["head", "backbone.layer1"]
    # ... and the orientation template, from the training inputs (32 px here: 32 x 32 thumbnails).
    assert meta.orientation["train_images"] > 0 and len(meta.orientation["template"]) == 32 * 32
    assert meta.orientation["fitted_on"].endswith(":train (template)")


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, mini_root, cache_dir):
    full = _cfg(mini_root, tmp_path / "full", cache_dir, epochs=3, augment="seed")
    train(full)
    part = _cfg(mini_root, tmp_path / "part", cache_dir, epochs=3, augment="seed")

    # Crash right after the first epoch's checkpoint, then --resume continues the run.
    class Crash(Exception):
        pass

    class CrashingTrainer(Trainer):
        def save_checkpoint(self, epoch):
            super().save_checkpoint(epoch)
            raise Crash

    with pytest.raises(Crash):
        CrashingTrainer(part).run()
    ckpt = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0
    train(part, resume=True)
    a = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    b = (tmp_path / "part" / "log.jsonl").read_text().splitlines()

    def strip(rows):
        return [{k: v for k, v in json.loads(r).items() if k not in ("seconds", "images_per_second")} for r in rows]

    assert strip(a) == strip(b)
    ma, _ = load_bundle(tmp_path / "full")
    mb, _ = load_bundle(tmp_path / "part")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k
    assert read_bundle_meta(tmp_path / "full").thresholds == read_bundle_meta(tmp_path / "part").thresholds


@pytest.mark.slow
def test_resume_refuses_a_different_recipe(tmp_path, mini_root, cache_dir):
    train(_cfg(mini_root, tmp_path, cache_dir, epochs=1))
    with pytest.raises(ChestXrayError, match="image_size"):
        train(_cfg(mini_root, tmp_path, cache_dir, epochs=2, image_size=48), resume=True)


def test_bundle_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", weights="none", freeze="seed", image_size=48).eval()
    meta = BundleMeta("resnet18", list(FINDINGS), model.preprocessing, [0.25] * 14, name="rt")
    path = save_bundle(model, meta, tmp_path / "m.safetensors")
    loaded, meta2 = load_bundle(path)
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta2.thresholds == [0.25] * 14 and meta2.preprocessing == model.preprocessing
    half = load_bundle(save_bundle(model, meta, tmp_path / "h.safetensors", half=True))[0]
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(model(x)), torch.sigmoid(half(x)), atol=2e-2)


def test_bundle_load_refuses_bad_bundles(tmp_path):
    from safetensors.torch import load_file, save_file

    model = create_model("resnet18", weights="none", freeze="all", image_size=32)
    meta = BundleMeta("resnet18", list(FINDINGS), model.preprocessing, [0.5] * 14)
    good = save_bundle(model, meta, tmp_path / "good.safetensors")
    state = load_file(str(good))
    # Wrong label count in the metadata.
    bad = BundleMeta("resnet18", list(FINDINGS[:13]), model.preprocessing, [0.5] * 13)
    save_file(state, str(tmp_path / "labels.safetensors"), metadata={"chestxray": bad.to_json()})
    with pytest.raises(BundleError, match="shape"):
        load_bundle(tmp_path / "labels.safetensors")
    # Missing tensors.
    partial = {k: v for k, v in state.items() if not k.startswith("backbone.layer4")}
    save_file(partial, str(tmp_path / "missing.safetensors"), metadata={"chestxray": meta.to_json()})
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path / "missing.safetensors")
    # Weights of another architecture.
    with pytest.raises(BundleError):
        other = BundleMeta("resnet50", list(FINDINGS), model.preprocessing, [0.5] * 14)
        save_file(state, str(tmp_path / "arch.safetensors"), metadata={"chestxray": other.to_json()})
        load_bundle(tmp_path / "arch.safetensors")
    # No metadata / not safetensors at all.
    save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BundleError, match="metadata"):
        load_bundle(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "junk.safetensors")
    with pytest.raises(BundleError, match="no model bundle"):
        load_bundle(tmp_path / "absent.safetensors")


def test_unknown_model_and_offline_weights_are_clear_errors():
    with pytest.raises(ChestXrayError, match=r"known models: .*resnet50"):
        create_model("resnet51", weights="none")
    with pytest.raises(WeightsUnavailableError, match="weights='none'"):
        create_model("resnet18", weights="imagenet")  # the test fixture blocks the network
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        create_model("resnet18", weights="/nonexistent/weights.pth")


def test_weights_file_loads_backbone(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    tv = resnet18()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    model = create_model("resnet18", weights=str(tmp_path / "r18.pth"), freeze="all")
    assert torch.equal(model.backbone.conv1.weight, tv.conv1.weight)
    assert model.backbone.fc.out_features == 14


def test_freeze_policies():
    m = create_model("resnet50", weights="none", freeze="seed")
    trainable = {n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4", "fc"}
    m = create_model("resnet18", weights="none", freeze="head")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"backbone.fc.weight", "backbone.fc.bias"}


def test_no_patient_on_two_sides(mini_root):
    index = load_nih(mini_root, val_fraction=0.3, seed=5)
    sides = {s: set(index.frame.loc[index.frame["split"] == s, "patient_id"]) for s in ("train", "val", "test")}
    assert sides["val"] and sides["train"] and sides["test"]
    assert (
        not (sides["train"] & sides["val"])
        and not (sides["train"] & sides["test"])
        and not (sides["val"] & sides["test"])
    )


@pytest.mark.slow
def test_cli_train_then_evaluate(tmp_path, mini_root, cache_dir, capsys, caplog):
    import logging

    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="chestxray"):
        rc = main(
            [
                "train",
                str(mini_root),
                "--out",
                str(run),
                "--weights",
                "none",
                "--freeze",
                "all",
                "--model",
                "resnet18",
                "--epochs",
                "1",
                "--image-size",
                "32",
                "--cache",
                str(cache_dir),
                "--val-fraction",
                "0.3",
            ]
        )
    assert rc == 0 and (run / "model.safetensors").is_file()
    # After the last epoch, each phase says what it is doing.
    said = [r.getMessage() for r in caplog.records]
    for phase in (
        "validation pass with the best weights",
        "tuning the thresholds",
        "input check: pooled features",
        "fitting the calibrator",
        f"writing {run / 'model.safetensors'}",
    ):
        assert any(m.startswith(phase) for m in said), phase
    rc = main(
        [
            "evaluate",
            "--model",
            str(run),
            str(mini_root),
            "--split",
            "test",
            "--out",
            str(tmp_path / "ev"),
            "--bootstrap",
            "100",
        ]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(FINDINGS)
    defined = [v for v in metrics["per_class"].values() if v["auroc"] is not None]
    assert defined and all(
        v["auroc_ci"][0] <= v["auroc"] <= v["auroc_ci"][1] for v in defined if v["auroc_ci"][0] is not None
    )
    assert all(v["auroc"] is None for v in metrics["per_class"].values() if v["support"] == 0)
    assert (tmp_path / "ev" / "roc_curves.png").stat().st_size > 1000
    assert "all negative" in (tmp_path / "ev" / "report.md").read_text()


@pytest.mark.slow
def test_ddp_two_processes_agree(tmp_path, mini_root, cache_dir):
    report = tmp_path / "report"
    report.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    import socket

    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        port,
        str(Path(__file__).parent / "ddp_worker.py"),
        str(tmp_path / "run"),
        str(cache_dir),
        str(mini_root),
        str(report),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((report / "rank0.json").read_text())
    r1 = json.loads((report / "rank1.json").read_text())
    assert r0["weights"] == r1["weights"]  # DDP keeps replicas identical
    assert r0["val_loss"] == pytest.approx(r1["val_loss"]) and r0["probs_sum"] == pytest.approx(r1["probs_sum"])
    assert r0["history"] == [
        {**h, "seconds": r0["history"][i]["seconds"], "images_per_second": r0["history"][i]["images_per_second"]}
        for i, h in enumerate(r1["history"])
    ]
    n_val = int((load_nih(mini_root, val_fraction=0.3).frame["split"] == "val").sum())
    assert r0["n_val_rows"] == n_val  # validation rows gathered from both ranks
    assert (tmp_path / "run" / "model.safetensors").is_file()
