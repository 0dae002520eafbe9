"""Grad-CAM: maps at the original size and aspect, in [0, 1], geometry right, hooks
removed, one forward pass for several findings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cam_helpers import all_hooks, brightness_analyzer
from chestxray.data.images import read_image
from chestxray.errors import ChestXrayError
from chestxray.evaluation.localization import peak_pixel
from chestxray.inference.explain import (
    CamResult,
    FindingTarget,
    explain,
    explain_image,
    gradcam,
    overlay,
    resolve_findings,
)
from chestxray.inference.predict import Analyzer
from chestxray.labels import FINDINGS

# One torch thread per test module (see conftest.single_torch_thread).
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def analyzer(tiny_bundle):
    return Analyzer.load(tiny_bundle)


def test_maps_have_the_original_size_and_lie_in_0_1(analyzer, original_png, mini_root):
    small = mini_root / "originals" / "00027426_000.png"  # 512 px original
    for path, shape in ((original_png, (1024, 1024)), (small, (512, 512))):
        pred, cams = explain(analyzer, path, ["Cardiomegaly", "Effusion"])
        assert pred.ok and pred.model == "tiny-test-model" and pred.file == str(path)
        assert [c.finding for c in cams] == ["Cardiomegaly", "Effusion"]
        for cam in cams:
            assert isinstance(cam, CamResult)
            assert cam.heatmap.shape == shape and cam.heatmap.dtype == np.float32
            assert cam.heatmap.min() >= 0.0 and cam.heatmap.max() <= 1.0
            assert cam.heatmap.max() in (0.0, 1.0)  # divided by its maximum (or nothing positive)
            assert cam.probability == pytest.approx(pred.probability(cam.finding))


def test_non_square_array_keeps_its_aspect(analyzer, sample_images):
    gray = read_image(sample_images[0])[:180, :]  # 180 x 256
    _, cams = explain(analyzer, gray, ["Mass"], name="crop")
    assert cams[0].heatmap.shape == (180, 256)


def test_default_findings_are_the_positives_or_the_top_one(analyzer, sample_images):
    seen_positive = seen_none = False
    for path in sample_images:
        pred, cams = explain(analyzer, path)
        if pred.positives:
            seen_positive = True
            assert [c.finding for c in cams] == [f.finding for f in pred.positives]
        else:
            seen_none = True
            assert [c.finding for c in cams] == [pred.findings[0].finding]
    # A strict-threshold copy has no positives: then the single most probable finding.
    strict = Analyzer(analyzer.backend, analyzer.labels, [1.0] * 14, analyzer.preprocessing, analyzer.name)
    pred, cams = explain(strict, sample_images[0])
    assert not pred.positives and len(cams) == 1
    assert cams[0].finding == max(pred.findings, key=lambda f: f.probability).finding
    assert seen_positive or seen_none


def test_probabilities_match_the_analyzer(analyzer, sample_images):
    pred_cam, _ = explain(analyzer, sample_images[1], ["Hernia"])
    pred = analyzer.predict(sample_images[1])
    assert [f.finding for f in pred_cam.findings] == [f.finding for f in pred.findings]
    for a, b in zip(pred_cam.findings, pred.findings):
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert a.threshold == b.threshold and a.positive == b.positive


def test_finding_names_are_checked_and_aliases_accepted(analyzer, sample_images):
    assert resolve_findings(FINDINGS, ["infiltrate", "Mass", "mass"]) == [3, 4]
    assert resolve_findings(FINDINGS, None) is None
    _, cams = explain(analyzer, sample_images[0], ["Infiltrate"])
    assert [c.finding for c in cams] == ["Infiltration"]
    with pytest.raises(ChestXrayError) as err:
        explain(analyzer, sample_images[0], ["Cardiomegaly", "Broken Heart"])
    assert "Broken Heart" in str(err.value) and "Pleural_Thickening" in str(err.value)
    assert not all_hooks(analyzer.model)


def test_no_hooks_left_after_success_or_error(analyzer, sample_images):
    model = analyzer.model
    assert not all_hooks(model)
    explain(analyzer, sample_images[0], ["Atelectasis", "Edema"])
    assert not all_hooks(model)

    def failing_select(probs):
        raise RuntimeError("boom")

    _, x = analyzer.preprocess(sample_images[0])
    with pytest.raises(RuntimeError, match="boom"):
        gradcam(model, x, failing_select, (256, 256))
    assert not all_hooks(model)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad touches no .grad


def test_one_forward_pass_for_several_findings(analyzer, sample_images):
    model = analyzer.model
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    try:
        _, cams = explain(analyzer, sample_images[2], ["Atelectasis", "Mass", "Nodule", "Hernia"])
    finally:
        handle.remove()
    assert len(cams) == 4 and len(calls) == 1
    assert len({c.heatmap.tobytes() for c in cams}) == 4  # four different maps, not one copied


def test_works_inside_no_grad_and_inference_mode_and_keeps_eval_mode(analyzer, sample_images):
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            _, cams = explain(analyzer, sample_images[0], ["Effusion"])
        assert cams[0].heatmap.shape == (256, 256)
    assert not analyzer.model.training


def test_finding_target_picks_one_logit():
    logits = torch.arange(28.0).view(2, 14)
    assert FindingTarget(3)(logits).tolist() == [3.0, 17.0]
    assert FindingTarget(5)(logits[1]).item() == 19.0


@pytest.mark.parametrize("where", ["bottom-left", "top-right"])
def test_a_bright_square_drives_the_map_in_place(where):
    """Known answer: in the brightness model the CAM is the cell brightness. On a
    non-square image the map must light the square where it is (no shift, flip or
    transposition) and stay 0 on the dark background."""
    analyzer = brightness_analyzer()
    h, w = 160, 240
    image = np.zeros((h, w), np.uint8)
    rows, cols = (slice(100, 140), slice(30, 70)) if where == "bottom-left" else (slice(10, 50), slice(170, 210))
    image[rows, cols] = 255
    gray, pred, cams = explain_image(analyzer, image, None, name="square")
    assert gray.shape == (h, w) and pred.model == "brightness-test-model"
    heat = cams[0].heatmap
    assert heat.shape == (h, w)
    r, c = peak_pixel(heat)
    assert rows.start <= r < rows.stop and cols.start <= c < cols.stop
    mask = np.zeros((h, w), bool)
    mask[rows, cols] = True
    assert heat[mask].mean() > 4 * heat[~mask].mean()
    far = heat[0, w - 1] if where == "bottom-left" else heat[h - 1, 0]  # the opposite corner
    assert far == 0.0
    # Its mirror image lights the mirrored place.
    _, mirrored = explain(analyzer, image[:, ::-1].copy(), [cams[0].finding])
    assert np.allclose(mirrored[0].heatmap, heat[:, ::-1], atol=1e-3)


def test_overlay_blends_a_colormap_over_the_radiograph():
    gray = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    heat = np.zeros((48, 64), np.float32)
    heat[:, 32:] = 1.0
    out = overlay(gray, heat)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    hot, cold = out[:, 40].astype(int), out[:, 8].astype(int)
    assert (hot[:, 0] > hot[:, 2]).all()  # red where the map is 1 (jet)
    assert (cold[:, 2] > cold[:, 0]).all()  # blue where it is 0
    assert np.array_equal(overlay(gray, heat, alpha=0.0), np.repeat(gray[..., None], 3, axis=2))
    with pytest.raises(ChestXrayError, match="differ in size"):
        overlay(gray, heat[:, :10])
    with pytest.raises(ChestXrayError, match="alpha"):
        overlay(gray, heat, alpha=1.5)


def test_no_positive_evidence_is_said_not_painted_blue(tmp_path):
    """A black image gives the brightness model an all-zero map for every finding: the CLI
    overlay shows the plain radiograph (no uniform blue tint), its caption and the JSON say
    "no positive evidence for X"; a map with evidence gets a colour bar below it."""
    import json

    from PIL import Image

    from chestxray.commands.predict import predict_with_cams, render
    from chestxray.inference.explain import cam_caption, colour_bar

    a = brightness_analyzer(thresholds=[0.99] * len(FINDINGS))
    black = np.zeros((40, 56), np.uint8)
    bright = np.zeros((40, 56), np.uint8)
    bright[:, 28:] = 255
    paths = []
    for name, arr in (("black.png", black), ("bright.png", bright)):
        Image.fromarray(arr).save(tmp_path / name)
        paths.append(tmp_path / name)
    preds = predict_with_cams(a, paths, tmp_path / "cams", ["Mass"], progress=False)
    records = {r["file"]: r for r in json.loads(render(preds, "json", a.name))}
    dark, lit = records[str(paths[0])]["overlays"][0], records[str(paths[1])]["overlays"][0]
    assert dark["note"] == "no positive evidence for Mass" and lit["note"] is None
    with Image.open(dark["path"]) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert rgb.shape == (40, 56, 3)  # no colour bar for an empty map
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and np.array_equal(rgb[..., 1], rgb[..., 2])  # gray, not blue
    with Image.open(lit["path"]) as im:
        assert im.height == 40 + colour_bar(56).shape[0] and im.width == 56
    cam = CamResult("Mass", 0.3, np.zeros((4, 4), np.float32))
    assert "no positive evidence for Mass" in cam_caption(cam, "m", 0.5)
    assert "no positive evidence" not in cam_caption(CamResult("Mass", 0.3, np.ones((4, 4), np.float32)), "m")
    assert "no positive evidence for Mass" in render(preds, "table", a.name)


def test_numpy_jet_table_is_matplotlibs():
    """The overlay's colour table is built without matplotlib (the [infer] install has none):
    it must be matplotlib's jet exactly, or the torch-free overlays would differ."""
    from matplotlib import colormaps

    from chestxray.inference.explain import _colormap_lut

    want = np.rint(colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0)
    assert np.array_equal(_colormap_lut(), want.astype(np.float32))


@pytest.mark.parametrize(
    ("grid", "size"), [((4, 4), (1024, 1024)), ((2, 3), (7, 5)), ((8, 8), (8, 8)), ((4, 4), (3, 2))]
)
def test_numpy_upsampling_is_torch_bilinear(grid, size):
    """upsample_map (numpy) gives what F.interpolate(bilinear, align_corners=False) gives, so
    maps are the same with and without torch."""
    import torch.nn.functional as F

    from chestxray.inference.explain import normalize_map, upsample_map

    cam = np.random.default_rng(0).normal(size=grid).astype(np.float32)
    up = F.interpolate(torch.from_numpy(cam)[None, None], size=size, mode="bilinear", align_corners=False)
    assert np.abs(upsample_map(cam, size) - normalize_map(up[0, 0].numpy())).max() < 1e-5


def test_cam_equals_gradcam_only_where_the_head_is_linear_on_the_pooled_block():
    """The export's cam output is claimed only where Grad-CAM is CAM: a ResNet (last block ->
    average pool -> linear), not a DenseNet (a ReLU sits between its last block and the pool)."""
    from chestxray.export.onnx import cam_equivalent_layer
    from chestxray.models.registry import cam_target_layer, create_model

    torch.manual_seed(0)
    resnet = create_model("resnet18", weights="none", freeze="all", image_size=64).eval()
    assert cam_equivalent_layer(resnet, 64) is cam_target_layer(resnet)
    densenet = create_model("densenet121", weights="none", freeze="all", image_size=64).eval()
    assert cam_equivalent_layer(densenet, 64) is None
