"""timm backbones through the registry (`--model timm/<name>`), end to end on a tiny one."""

import numpy as np
import pytest
import torch

from chestxray.cli import main
from chestxray.errors import ChestXrayError, WeightsUnavailableError
from chestxray.labels import FINDINGS
from chestxray.models.bundle import BundleMeta, load_bundle, save_bundle
from chestxray.models.registry import cam_target_layer, create_model

timm = pytest.importorskip("timm")

NAME = "timm/resnet10t"


def test_timm_model_by_name_with_its_own_config():
    model = create_model(NAME, weights="none", freeze="seed", image_size=32)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 14)
    cfg = timm.create_model("resnet10t", pretrained=False).pretrained_cfg
    assert model.preprocessing.mean == tuple(cfg["mean"]) and model.preprocessing.std == tuple(cfg["std"])
    trained = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4", "fc"}  # the seed policy, generalised
    assert cam_target_layer(model) is model.backbone.layer4
    assert create_model(NAME, weights="none", freeze="all").preprocessing.size == cfg["input_size"][-1]


def test_unknown_timm_model_and_offline_weights_are_clear_errors(monkeypatch):
    with pytest.raises(ChestXrayError, match="unknown timm model"):
        create_model("timm/not_a_model_xyz", weights="none")
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("no network")  # what the hub download raises offline, without waiting
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsUnavailableError, match="weights='none'"):
        create_model(NAME, weights="imagenet")


@pytest.mark.slow
def test_timm_bundle_predicts_explains_and_exports(tmp_path, original_png, capsys):
    from chestxray.inference.explain import explain
    from chestxray.inference.predict import Analyzer

    torch.manual_seed(0)
    model = create_model(NAME, weights="none", freeze="all", image_size=48).eval()
    meta = BundleMeta(NAME, list(FINDINGS), model.preprocessing, [0.5] * 14, name="tiny-timm")
    path = save_bundle(model, meta, tmp_path / "timm.safetensors")
    loaded, _ = load_bundle(path)
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    analyzer = Analyzer.load(path)
    _, cams = explain(analyzer, original_png, findings=["Effusion"])
    assert cams[0].heatmap.shape == (1024, 1024) and 0.0 <= cams[0].heatmap.min() <= cams[0].heatmap.max() <= 1.0
    assert main(["export", "--model", str(path), "--onnx", str(tmp_path / "t.onnx")]) == 0
    assert "max |p_onnx - p_torch|" in capsys.readouterr().out
    onnx = Analyzer.load(tmp_path / "t.onnx", backend="onnx")
    a, b = analyzer.predict(original_png), onnx.predict(original_png)
    np.testing.assert_allclose(
        [f.probability for f in a.findings], [b.probability(f.finding) for f in a.findings], atol=1e-4
    )
