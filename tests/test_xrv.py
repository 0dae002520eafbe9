"""`chestxray import xrv`: torchxrayvision's weights as bundles, checked against torchxrayvision
itself (random weights saved the way their release files are), on real NIH radiographs; and an
imported DenseNet used like a native bundle (predict, Grad-CAM, evaluate, serve, ONNX, embed)."""

from __future__ import annotations

import io
import math
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chestxray.data.images import read_image
from chestxray.data.transforms import EvalPreset, Preprocessing
from chestxray.errors import ChestXrayError, WeightsUnavailableError
from chestxray.inference.predict import Analyzer
from chestxray.models import xrv_import
from chestxray.models.bundle import load_bundle, read_bundle_meta
from chestxray.models.xrv_import import import_xrv
from chestxray.models.xrv_weights import XRV_WEIGHTS, kept_outputs

xrv = pytest.importorskip("torchxrayvision", reason="the parity tests need torchxrayvision (dev extra)")

MINI = Path(__file__).parent / "data" / "nih-mini"
ORIGINALS = sorted((MINI / "originals").glob("*.png"))  # 1024 and 512 px NIH originals, one RGBA


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory) -> list[Path]:
    """Real radiographs: two NIH originals and one cut to 1024 x 800 (so the centre crop matters)."""
    folder = tmp_path_factory.mktemp("xrv-images")
    gray = read_image(ORIGINALS[0])
    wide = folder / "wide.png"
    Image.fromarray(gray[100:900, :]).save(wide)
    return [ORIGINALS[0], ORIGINALS[2], wide]


def their_input(path: Path, size: int) -> torch.Tensor:
    """torchxrayvision's documented pipeline: 8-bit image -> normalize(img, 255) -> centre crop
    -> skimage resize (their XRayResizer)."""
    import skimage.io
    import torchvision

    img = skimage.io.imread(str(path))
    if img.ndim == 3:  # their README: take one channel of a colour file (our read_image: luminance)
        img = img[:, :, 0]
    img = xrv.datasets.normalize(img, 255)[None, ...]
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(size)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.from_numpy(transform(img))[None]


def calibration_images() -> list[Path]:
    """Eight different patients' radiographs: the spread the random head is scaled to."""
    return sorted((MINI / "images").glob("*.png"))[:6] + ORIGINALS[:1] + ORIGINALS[2:]


def shrink_head(head: torch.nn.Linear, features: torch.Tensor, seed: int) -> None:
    """Random head scaled so the logits on real images are about N(0, 1): probabilities spread
    over (0, 1) instead of sitting at 0 or 1, which would make any comparison vacuous."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(head.out_features, head.in_features, generator=g)
    logits = features @ w.T  # (images, outputs); random features differ little between images
    scale = logits.std(0, keepdim=True).T  # per output, across images
    with torch.no_grad():
        head.weight.copy_(w / scale)
        head.bias.copy_(-(logits / scale.T).mean(0))


@pytest.fixture(scope="module")
def their_densenet(radiographs, tmp_path_factory):
    """Their DenseNet-121 (weights=None, seeded), saved as their release files are: torch.save of
    the whole model."""
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None, num_classes=18).eval()
    with torch.no_grad():
        feats = model.features2(torch.cat([their_input(p, 224) for p in calibration_images()]))
    shrink_head(model.classifier, feats, seed=1)
    path = tmp_path_factory.mktemp("xrv-release") / XRV_WEIGHTS["densenet121-res224-all"].filename
    torch.save(model, path)
    return model, path


@pytest.fixture(scope="module")
def dense_bundle(their_densenet, tmp_path_factory) -> Path:
    path, _ = import_xrv(
        "densenet121-res224-all",
        tmp_path_factory.mktemp("xrv-bundle") / "dn.safetensors",
        file=their_densenet[1],
        trust_pickle=True,
    )
    return path


@pytest.fixture(scope="module")
def small_bundle(dense_bundle, tmp_path_factory) -> Path:
    """The imported bundle at 64 px (the network is fully convolutional; `train --init
    --image-size` makes the same change): the native-bundle checks, at a CPU test's cost."""
    import dataclasses

    from chestxray.models.bundle import save_bundle

    net, meta = load_bundle(dense_bundle)
    meta.preprocessing = dataclasses.replace(meta.preprocessing, size=64)
    return save_bundle(net, meta, tmp_path_factory.mktemp("xrv-small") / "dn64.safetensors")


def test_bundle_records_their_preprocessing_thresholds_and_provenance(dense_bundle, their_densenet):
    meta = read_bundle_meta(dense_bundle)
    w = XRV_WEIGHTS["densenet121-res224-all"]
    assert meta.architecture == "xrv-densenet121"
    assert meta.labels[:2] == ["Atelectasis", "Consolidation"] and len(meta.labels) == 18
    assert meta.thresholds == pytest.approx(list(w.op_threshs))
    assert "torchxrayvision" in meta.threshold_method and "op_threshs" in meta.threshold_method
    pre = meta.preprocessing
    assert (pre.size, pre.crop, pre.mean, pre.std) == (224, "center", (0.5,), (1 / 2048,))
    src = meta.training["source"]
    assert src["url"] == w.url and src["url"].startswith("https://github.com/mlmed/torchxrayvision/releases/")
    from chestxray.io import file_sha256

    assert src["sha256"] == file_sha256(their_densenet[1]) and "Apache" in src["licence"]


def test_densenet_matches_torchxrayvision_on_the_same_tensor(dense_bundle, their_densenet, radiographs):
    model, _ = their_densenet
    net, meta = load_bundle(dense_bundle)
    x = torch.from_numpy(EvalPreset(meta.preprocessing).batch([read_image(p) for p in radiographs]))
    with torch.no_grad():
        theirs = torch.sigmoid(model(x * 2048 - 1024)).numpy()  # their scaling, on our resized pixels
        ours = torch.sigmoid(net(x)).numpy()
    assert theirs.std() > 0.1 and theirs.min() > 0.02 and theirs.max() < 0.98  # not a vacuous comparison
    assert np.abs(ours - theirs).max() <= 1e-5


def test_densenet_matches_torchxrayvision_from_the_image_file(dense_bundle, their_densenet, radiographs):
    model, _ = their_densenet
    analyzer = Analyzer.load(dense_bundle)
    with torch.no_grad():
        theirs_all = torch.sigmoid(model(torch.cat([their_input(p, 224) for p in radiographs]))).numpy()
    for path, theirs, pred in zip(radiographs, theirs_all, analyzer.predict(radiographs)):
        ours = np.array([pred.probability(lab) for lab in analyzer.labels])
        # Each side with its own preprocessing: theirs skimage.io + normalize + XRayCenterCrop +
        # XRayResizer (scikit-image), ours read_image + the eval preset (the same resize written
        # in numpy, on [0, 1] values that the graph scales back). What remains is float32
        # rounding of the scaling done in another order (~1e-4 of 2048 input units), far below
        # the 1e-2 asked for.
        assert np.abs(ours - theirs).max() <= 1e-4, path.name


def test_grad_cam_covers_the_centre_square(small_bundle, radiographs):
    from chestxray.inference.explain import explain

    analyzer = Analyzer.load(small_bundle)
    pred, cams = explain(analyzer, radiographs[2], ["Effusion"])  # 800 x 1024: square is columns 112..911
    heat = cams[0].heatmap
    assert heat.shape == (800, 1024) and pred.probability("Effusion") == pytest.approx(
        analyzer.predict(radiographs[2]).probability("Effusion"), abs=1e-6
    )
    assert heat[:, :112].max() == 0 and heat[:, 912:].max() == 0 and heat[:, 112:912].max() == pytest.approx(1.0)


@pytest.mark.slow
def test_imported_bundle_evaluates_and_serves(small_bundle, tmp_path, mini_root):
    import warnings

    from chestxray.data.index import load_nih
    from chestxray.evaluation.evaluate import run_evaluation
    from chestxray.serve.app import create_app

    analyzer = Analyzer.load(small_bundle)
    result = run_evaluation(analyzer, load_nih(mini_root), "test", tmp_path, n_boot=0)
    not_scored = set(result["label_mapping"]["not_scored_model_only"])
    assert not_scored == {"Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"}
    assert len(result["per_class"]) == 14 and (tmp_path / "roc_curves.png").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    png = ORIGINALS[0].read_bytes()
    with TestClient(create_app(analyzer)) as client:
        r = client.post("/api/v1/predict", files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 200
        got = {f["finding"]: f["probability"] for f in r.json()["findings"]}
        assert got["Effusion"] == pytest.approx(analyzer.predict(ORIGINALS[0]).probability("Effusion"), abs=1e-6)
        model = client.get("/api/v1/model").json()
        assert model["preprocessing"]["crop"] == "center" and model["preprocessing"]["mean"] == [0.5]
        r = client.post("/api/v1/cam?finding=Lung%20Opacity", files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.slow
def test_densenet_onnx_export_matches_torchxrayvision_and_gives_features(
    small_bundle, their_densenet, radiographs, tmp_path
):
    import onnxruntime as ort

    from chestxray.export.onnx import export_bundle

    model, _ = their_densenet
    out = export_bundle(small_bundle, tmp_path / "dn.onnx", check_images=radiographs[:1]).path
    pre = read_bundle_meta(small_bundle).preprocessing
    x = EvalPreset(pre).batch([read_image(p) for p in radiographs])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probs, feats = session.run(["probabilities", "features"], {"image": x})
    with torch.no_grad():
        t = torch.from_numpy(x) * 2048 - 1024
        theirs, their_feats = torch.sigmoid(model(t)).numpy(), model.features2(t).numpy()
    assert np.abs(probs - theirs).max() <= 1e-5
    assert np.abs(feats - their_feats).max() <= 1e-4 * np.abs(their_feats).max()
    # The Analyzer's embeddings agree between backends.
    onnx_emb = Analyzer.load(out).embed(radiographs).vectors
    torch_emb = Analyzer.load(small_bundle).embed(radiographs).vectors
    assert onnx_emb.shape == (3, 1024) and np.allclose(onnx_emb, torch_emb, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_resnet50_matches_torchxrayvision(tmp_path, radiographs):
    """Their ResNet cannot be built without weights: save a ResNet-50 state dict in their layout
    under their release name, load it with their class from that folder (no download), compare
    with sigmoid(model.model(x)) on the same tensor, from the file, and through ONNX."""
    import onnxruntime as ort
    import torchvision

    from chestxray.export.onnx import export_bundle

    w = XRV_WEIGHTS["resnet50-res512-all"]
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, num_classes=18)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.eval()
    image = radiographs[2]
    with torch.no_grad():
        body = torch.nn.Sequential(*list(net.children())[:-1], torch.nn.Flatten(1))
        shrink_head(net.fc, body(torch.cat([their_input(p, 512) for p in calibration_images()[::2]])), seed=2)
    torch.save(net.state_dict(), tmp_path / w.filename)
    theirs_model = xrv.models.ResNet(weights="resnet50-res512-all", cache_dir=str(tmp_path))
    bundle, meta = import_xrv(w.name, tmp_path / "rn.safetensors", file=tmp_path / w.filename)  # no --trust-pickle
    kept = [i for i, _, _ in kept_outputs(w)]
    assert len(meta.labels) == 16 and "Lung Lesion" not in meta.labels and meta.preprocessing.size == 512

    ours_net, _ = load_bundle(bundle)
    x = torch.from_numpy(EvalPreset(meta.preprocessing)(read_image(image)))[None]
    with torch.no_grad():
        theirs = torch.sigmoid(theirs_model.model(x * 2048 - 1024))[0, kept].numpy()
        ours = torch.sigmoid(ours_net(x))[0].numpy()
        from_file = torch.sigmoid(theirs_model.model(their_input(image, 512)))[0, kept].numpy()
    assert theirs.std() > 0.05 and np.abs(ours - theirs).max() <= 1e-5
    analyzer = Analyzer.load(bundle)
    file_probs = analyzer.predict(image)
    ours_file = np.array([file_probs.probability(lab) for lab in analyzer.labels])
    assert np.abs(ours_file - from_file).max() <= 1e-4  # each side's own pipeline, as for the DenseNet

    out = export_bundle(bundle, tmp_path / "rn.onnx", check_images=[image]).path
    probs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"image": x.numpy()}
    )
    assert np.abs(probs[0][0] - theirs).max() <= 1e-5


# ---- the unsafe step, and only there ---------------------------------------------------------


def test_pickled_model_needs_trust_pickle_and_writes_nothing(their_densenet, tmp_path):
    out = tmp_path / "b.safetensors"
    with pytest.raises(ChestXrayError, match="trust_pickle=True"):
        import_xrv("densenet121-res224-nih", out, file=their_densenet[1])
    assert not out.exists() and not list(tmp_path.iterdir())


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_foreign_globals(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"classifier.weight": torch.zeros(1), "x": _Evil()}, path)
    with pytest.raises(ChestXrayError, match=r"refused global (posix|os|nt)\.system"):
        import_xrv("densenet121-res224-all", tmp_path / "out", file=path, trust_pickle=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        xrv_import.RestrictedUnpickler(io.BytesIO(pickle.dumps(eval, protocol=4))).load()


def test_legacy_format_pickle_reads_the_same(their_densenet, dense_bundle, tmp_path):
    """Their 2019-2020 files predate torch's zip format: the legacy format reads the same."""
    model, _ = their_densenet
    legacy = tmp_path / "legacy.pt"
    torch.save(model, legacy, _use_new_zipfile_serialization=False)
    out, _ = import_xrv("densenet121-res224-all", tmp_path / "l.safetensors", file=legacy, trust_pickle=True)
    from safetensors.torch import load_file

    a, b = load_file(str(out)), load_file(str(dense_bundle))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_untrained_slots_are_dropped(their_densenet, tmp_path):
    _, meta = import_xrv("densenet121-res224-rsna", tmp_path / "r", file=their_densenet[1], trust_pickle=True)
    assert meta.labels == ["Pneumonia", "Lung Opacity"]
    assert meta.training["source"]["output_index"] == {"Pneumonia": 8, "Lung Opacity": 16}
    assert (tmp_path / "r" / "model.safetensors").is_file()
    w = XRV_WEIGHTS["densenet121-res224-nih"]
    assert [lab for _, lab, _ in kept_outputs(w)] == list(w.labels[:14])
    assert all(not math.isnan(t) for _, _, t in kept_outputs(w))
    from chestxray.data.harmonise import VOCABULARY

    assert all(lab in VOCABULARY for weights in XRV_WEIGHTS.values() for _, lab, _ in kept_outputs(weights))


# ---- download ------------------------------------------------------------------------------


def test_offline_fails_fast_naming_file_and_writes_nothing(tmp_path, monkeypatch):
    # conftest makes urllib.request.urlopen refuse, as an offline machine does. A refusal ends
    # the wait at once: with a 60 s connect timeout, the error still comes in far less.
    real = xrv_import.download
    monkeypatch.setattr(xrv_import, "download", lambda url, dest, **kw: real(url, dest, connect_timeout=60))
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="file="):
        import_xrv("densenet121-res224-all", tmp_path / "b.safetensors")
    assert time.perf_counter() - start < 30
    assert not list(tmp_path.iterdir())


def test_a_hanging_network_gives_up_quickly(tmp_path, monkeypatch):
    import threading
    import urllib.request

    release = threading.Event()  # the "server" answers only when the test ends
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: release.wait(120))
    start = time.perf_counter()
    try:
        with pytest.raises(WeightsUnavailableError, match="file="):
            xrv_import.download("https://example.invalid/w.pt", tmp_path / "w.pt", connect_timeout=0.2)
        assert time.perf_counter() - start < 60  # gave up after its timeout, not when the network answered
    finally:
        release.set()


def test_download_path_records_url_and_hash(their_densenet, tmp_path, monkeypatch, capsys):
    from chestxray.cli import main

    fetched = []

    def fake_download(url, dest, **kw):
        fetched.append(url)
        dest.write_bytes(their_densenet[1].read_bytes())

    monkeypatch.setattr(xrv_import, "download", fake_download)
    rc = main(["import", "xrv", "densenet121-res224-chex", "--out", str(tmp_path / "c.safetensors"), "--trust-pickle"])
    assert rc == 0 and fetched == [XRV_WEIGHTS["densenet121-res224-chex"].url]
    meta = read_bundle_meta(tmp_path / "c.safetensors")
    assert meta.training["source"]["obtained"] == "downloaded" and len(meta.labels) == 11
    err = capsys.readouterr().err
    assert "SHA-256 " + meta.training["source"]["sha256"] in err and "--trust-pickle" in err


# ---- preprocessing -------------------------------------------------------------------------


def test_preprocessing_round_trip_and_old_bundles():
    from chestxray.models.xrv_weights import xrv_preprocessing

    pre = xrv_preprocessing(224)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    old = {"size": 64, "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}  # a bundle written before crops
    assert Preprocessing.from_dict(old).crop == "none" and Preprocessing.from_dict(old).channels == 3
    with pytest.raises(ChestXrayError):
        Preprocessing.from_dict({**old, "crop": "sideways"})
    from chestxray.models.registry import InputNormalize

    x = torch.tensor([0.0, 1 / 255, 0.5, 1.0]).view(1, 1, 1, 4)
    assert torch.equal(InputNormalize(pre.mean, pre.std)(x), x * 2048 - 1024)


@pytest.mark.parametrize("shape,size", [((1024, 1024), 224), ((800, 1024), 512), ((256, 256), 512), ((333, 301), 64)])
def test_xrv_resize_is_scikit_image_resize(shape, size):
    import skimage.transform

    from chestxray.data.transforms import xrv_resize

    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    theirs = skimage.transform.resize(
        xrv.datasets.normalize(img, 255), (size, size), mode="constant", preserve_range=True
    )
    assert np.abs(xrv_resize(img, size) - theirs).max() <= 2e-4  # float32 rounding of values up to 1024


def test_eval_preset_crops_the_centre_square():
    img = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10)
    pre = Preprocessing(size=6, mean=(0.5,), std=(0.5,), crop="center")
    assert np.allclose(EvalPreset(pre)(img)[0], img[:, 2:8] / 255.0, rtol=0, atol=1e-7)


# ---- fine-tuning from a bundle -----------------------------------------------------------------


def test_init_remaps_output_rows_by_name_and_freezes(small_bundle):
    from chestxray.training.init import init_from_bundle

    source, meta = load_bundle(small_bundle)
    model, remap, arch = init_from_bundle(small_bundle, ["Effusion", "Lung Opacity", "Brand New"], freeze="seed")
    assert arch == "xrv-densenet121" and remap.kept == ["Effusion", "Lung Opacity"] and remap.new == ["Brand New"]
    assert "Atelectasis" in remap.dropped and len(remap.dropped) == 16
    old, new = source.backbone.classifier, model.backbone.classifier
    for row, lab in enumerate(["Effusion", "Lung Opacity"]):
        assert torch.equal(new.weight[row], old.weight[meta.labels.index(lab)])
    assert not any(torch.equal(new.weight[2], w) for w in old.weight)
    assert torch.equal(model.backbone.features.conv0.weight, source.backbone.features.conv0.weight)
    assert model.preprocessing == meta.preprocessing  # scaling and crop kept
    trainable = {n.split(".")[1] for n, p in model.backbone.named_parameters() if p.requires_grad and "." in n}
    assert trainable == {"denseblock3", "transition3", "denseblock4", "norm5", "weight", "bias"}
    model, _, _ = init_from_bundle(small_bundle, ["Effusion"], freeze="head", image_size=32)
    assert [n for n, p in model.backbone.named_parameters() if p.requires_grad] == [
        "classifier.weight",
        "classifier.bias",
    ]
    assert model.preprocessing.size == 32 and model.preprocessing.crop == "center"


@pytest.mark.slow
def test_train_init_fine_tunes_the_imported_densenet(small_bundle, tmp_path, mini_root, caplog):
    import logging

    from chestxray.training.loop import TrainConfig, train

    cfg = TrainConfig(
        root=str(mini_root),
        out=str(tmp_path / "run"),
        init=str(small_bundle),
        freeze="head",
        epochs=1,
        batch_size=8,
        max_steps=2,
        image_size=32,
        cache=str(tmp_path / "cache"),
        device="cpu",
        workers=1,
        val_fraction=0.3,
        lr=1e-3,
    )
    with caplog.at_level(logging.INFO, logger="chestxray.training.loop"):
        bundle = train(cfg)
    assert "output rows kept 14" in caplog.text and "dropped 4 (Lung Lesion, Fracture, Lung Opacity" in caplog.text
    meta = read_bundle_meta(bundle)
    assert meta.architecture == "xrv-densenet121" and len(meta.labels) == 14
    assert (meta.preprocessing.size, meta.preprocessing.mean, meta.preprocessing.crop) == (32, (0.5,), "center")
    assert Analyzer.load(bundle).predict(ORIGINALS[0]).ok
    # Trained on the framing it predicts with: a centre-cropped cache, not the whole-image one.
    assert (tmp_path / "cache" / "32-center" / "images.npy").is_file() and not (tmp_path / "cache" / "32").exists()


def test_init_and_weights_are_mutually_exclusive(small_bundle, tmp_path, mini_root, capsys):
    from chestxray.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", str(mini_root), "--out", str(tmp_path), "--init", str(small_bundle), "--weights", "none"])
    assert exc.value.code == 2 and "argument --weights: not allowed with argument --init" in capsys.readouterr().err


# ---- embeddings --------------------------------------------------------------------------------


def test_predict_features_writes_one_vector_per_image(small_bundle, tmp_path, capsys):
    from chestxray.cli import main

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    images = [ORIGINALS[0], broken]
    rc = main(["predict", *map(str, images), "--model", str(small_bundle), "--features", str(tmp_path / "f.npy")])
    vectors = np.load(tmp_path / "f.npy")
    assert rc == 1 and vectors.shape == (2, 1024) and np.isnan(vectors[1]).all()
    from chestxray.commands.predict import write_features

    analyzer = Analyzer.load(small_bundle)
    expected = analyzer.embed([ORIGINALS[0]]).vectors[0]
    assert np.allclose(vectors[0], expected, rtol=1e-5, atol=1e-4) and np.abs(expected).max() > 0
    assert write_features(analyzer, [ORIGINALS[0]], tmp_path / "f.csv", progress=False) == 0
    import pandas as pd

    frame = pd.read_csv(tmp_path / "f.csv")
    assert list(frame.columns[:2]) == ["file", "f0"] and frame.shape == (1, 1025)
    assert np.allclose(frame.iloc[0, 1:].to_numpy(dtype=np.float32), expected, rtol=1e-5, atol=1e-3)
    pytest.importorskip("pyarrow")
    assert write_features(analyzer, [ORIGINALS[0]], tmp_path / "f.parquet", progress=False) == 0
    table = pd.read_parquet(tmp_path / "f.parquet")
    assert table["file"].tolist() == [str(ORIGINALS[0])] and np.allclose(
        table.iloc[0, 1:].to_numpy(np.float32), expected
    )
