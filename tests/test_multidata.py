"""Masked labels (loss, metrics, thresholds), the memmap loader, and training on two
datasets at once (NIH + the CheXpert fixture) end to end on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chestxray.cli import main
from chestxray.evaluation.metrics import evaluate_predictions, per_class_auroc
from chestxray.evaluation.thresholds import tune_thresholds
from chestxray.training.losses import masked_bce_with_logits

DATA = Path(__file__).parent / "data"


def test_unknown_label_changes_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, float("nan"), 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    masked_bce_with_logits(logits, y).backward()
    grad = logits.grad.clone()
    assert torch.isfinite(grad).all()
    unknown = torch.isnan(y)
    assert (grad[unknown] == 0).all() and (grad[~unknown] != 0).all()
    # Whatever sits in an unknown cell (here 1, then 0 marked unknown) the gradients are the same.
    for fill in (0.0, 1.0):
        logits.grad = None
        y2 = torch.where(unknown, torch.full_like(y, fill), y)
        known = ~unknown
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y2, reduction="none")
        (loss * known).sum().div(known.sum()).backward()
        torch.testing.assert_close(logits.grad, grad)
    # No unknowns: the same as the plain loss.
    full = torch.tensor([[1.0, 0.0, 1.0]] * 4)
    torch.testing.assert_close(
        masked_bce_with_logits(logits, full), torch.nn.functional.binary_cross_entropy_with_logits(logits, full)
    )


def test_metrics_and_thresholds_skip_unknown():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 2)).astype(float)
    p = np.clip(y * 0.3 + rng.random((60, 2)) * 0.7, 0, 1)
    masked = y.copy()
    masked[:20, 0] = np.nan  # the first 20 images do not label finding 0
    auroc = per_class_auroc(masked, p)
    assert auroc[0] == pytest.approx(per_class_auroc(y[20:, :1], p[20:, :1])[0])
    assert auroc[1] == pytest.approx(per_class_auroc(y[:, 1:], p[:, 1:])[0])
    res = evaluate_predictions(masked, p, np.array([0.5, 0.5]), ["a", "b"], groups=np.arange(60), n_boot=50)
    assert res["per_class"]["a"]["labelled"] == 40 and "labelled" not in res["per_class"]["b"]
    assert res["per_class"]["a"]["support"] == int(y[20:, 0].sum())
    assert res["per_class"]["a"]["auroc_ci"][0] is not None
    tuned = tune_thresholds(p, masked, ["a", "b"])
    assert tuned.thresholds[0] == pytest.approx(tune_thresholds(p[20:, :1], y[20:, :1], ["a"]).thresholds[0])


def test_memmap_batches_equal_ram_batches(tmp_path):
    from chestxray.data.loader import CacheBatches, MemmapImages, choose_loader

    a = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.uint8, shape=(7, 4, 4))
    b = np.lib.format.open_memmap(tmp_path / "b.npy", mode="w+", dtype=np.uint8, shape=(5, 4, 4))
    a[:] = np.arange(7)[:, None, None]
    b[:] = 100 + np.arange(5)[:, None, None]
    images = MemmapImages([(a, np.array([6, 0, 3])), (b, np.array([4, 1]))])
    assert len(images) == 5 and images.nbytes == 5 * 16
    ram = images.to_ram()
    np.testing.assert_array_equal(ram[:, 0, 0], [6, 0, 3, 104, 101])
    labels = np.arange(10, dtype=np.float32).reshape(5, 2)
    got = [x for _, x, _ in CacheBatches(images, labels, 2, shuffle=True, seed=3)]
    want = [x for _, x, _ in CacheBatches(ram, labels, 2, shuffle=True, seed=3)]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert choose_loader(10, "auto") == "ram" and choose_loader(1 << 62, "auto") == "memmap"
    assert choose_loader(10, "memmap") == "memmap"


@pytest.mark.slow
def test_train_on_nih_and_chexpert_fixture(tmp_path, mini_root, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        str(mini_root),
        f"chexpert:{DATA / 'chexpert-mini'}",
        "--out",
        str(out),
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--freeze",
        "all",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--max-steps",
        "3",
        "--cache",
        str(tmp_path / "cache"),
        "--val-fraction",
        "0.3",
        "--workers",
        "1",
        "--loader",
        "memmap",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "chexpert:" in printed and "bundle written" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    by = log[0]["extra"]["val_auroc_by_dataset"]
    assert set(by) == {str(mini_root), f"chexpert:{DATA / 'chexpert-mini'}"}
    import yaml

    meta = yaml.safe_load((out / "config.yaml").read_text())["options"]  # config.yaml replaced config.json
    assert meta["root"] == [str(mini_root), f"chexpert:{DATA / 'chexpert-mini'}"]
    from chestxray.models.bundle import read_bundle_meta

    bundle = read_bundle_meta(out / "model.safetensors")
    # NIH's 14 and the CheXpert findings it does not have, in vocabulary order.
    assert bundle.labels[:14] == [
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Fibrosis",
        "Pleural_Thickening",
        "Hernia",
    ]
    assert "Lung Opacity" in bundle.labels and "Pleural Effusion" not in bundle.labels
    ds = bundle.training["datasets"]
    assert ds["chexpert:chexpert-mini"]["images"] == {"train": 24, "val": 30}  # the lateral is left out
    assert ds["chexpert:chexpert-mini"]["labels_from"]["Effusion"] == ["Pleural Effusion"]
    assert set(bundle.metrics["validation"]["by_dataset"]) == {"nih-mini", "chexpert:chexpert-mini"}
    # The bundle predicts, explains and exports as any other.
    image = next((DATA / "chexpert-mini").rglob("*.jpg"))
    assert main(["predict", str(image), "--model", str(out), "--format", "json", "--cam", str(tmp_path / "cam")]) == 0
    pred = json.loads(capsys.readouterr().out)[0]
    assert sorted(f["finding"] for f in pred["findings"]) == sorted(bundle.labels)
    assert list((tmp_path / "cam").glob("*.png"))
    assert main(["export", "--model", str(out), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1000
