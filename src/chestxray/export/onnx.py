"""Export a bundle to ONNX and check that onnxruntime agrees with PyTorch.

The graph takes what the eval preset makes, gray float32 (N, 1, S, S) in [0, 1] with a
dynamic batch N, and returns probabilities (the sigmoid is in the graph, so a user of the
bare file gets the same numbers as `chestxray predict`). Gray-to-3-channel and the
mean/std normalisation are inside the model already (`InputNormalize`), so nothing but
the eval preset (resize, /255) is left to the caller. The bundle's JSON is stored in the
ONNX metadata under "chestxray", with a few readable keys beside it.

After export, the file is run on real radiographs (the packaged samples, or images the
caller names) with onnxruntime and with PyTorch; the export fails, and nothing is written,
when the probabilities differ by more than the tolerance (1e-4 by default).

Needs torch, onnx, onnxscript and onnxruntime (`pip install chestxray[torch,export]`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.data.images import read_image
from chestxray.data.transforms import EvalPreset, Preprocessing
from chestxray.errors import BundleError, ExportError
from chestxray.inference.onnx_backend import (
    CAM_NAME,
    FEATURES_NAME,
    INPUT_NAME,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    OUTPUT_NAME,
    SCORE_NAME,
    ort_session,
)
from chestxray.io import file_sha256
from chestxray.models.bundle import META_KEY, BundleMeta

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 18  # torch.onnx's exporter starts at 18; onnx's converter cannot take it lower
DEFAULT_TOLERANCE = 1e-4


@dataclass
class ParityReport:
    """onnxruntime vs PyTorch on real images."""

    max_abs_diff: float
    images: list[str]
    batch_sizes: list[int]
    agree: int  # (image, finding) pairs with the same positive/negative call
    pairs: int
    reference: str = "PyTorch float32 (eager, CPU)"
    tolerance: float | None = None
    score_max_rel_diff: float | None = None  # input-check score, |onnx - torch| / torch
    # Grad-CAM maps (each scaled to [0, 1], every finding, on the target layer's grid): the graph's
    # class activation maps against torch's Grad-CAM; None when the graph has no cam output.
    cam_max_abs_diff: float | None = None

    @property
    def ok(self) -> bool:
        if self.tolerance is None:
            return True
        cam = self.cam_max_abs_diff if self.cam_max_abs_diff is not None else 0.0
        return self.max_abs_diff <= self.tolerance and cam <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        tol = f" (tolerance {self.tolerance:.0e})" if self.tolerance is not None else ""
        cam = "" if self.cam_max_abs_diff is None else f"; Grad-CAM maps differ by at most {self.cam_max_abs_diff:.2e}"
        return (
            f"max |p_onnx - p_torch| = {self.max_abs_diff:.2e}{tol} on {len(self.images)} real images "
            f"(batches of {', '.join(map(str, self.batch_sizes))}); same positive/negative call on "
            f"{self.agree}/{self.pairs} image-finding pairs{cam}"
        )


@dataclass
class ExportResult:
    path: Path
    bytes: int
    opset: int
    quantization: str
    parity: ParityReport
    float_parity: ParityReport | None = None  # the float32 graph's check, when int8 was written
    seconds: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)


def _torch_modules():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import torch
    except ImportError as exc:
        raise ExportError(
            f"export needs torch, onnx, onnxscript and onnxruntime ({exc.name} is missing): "
            "pip install 'chestxray[torch,export]'"
        ) from None
    return torch


def load_check_images(
    paths: Sequence[str | os.PathLike] | None, preprocessing: Preprocessing, limit: int = 8
) -> tuple[list[str], np.ndarray]:
    """Names and eval-preset batch of the check images (default: the packaged samples)."""
    if not paths:
        from chestxray.samples import sample_images

        files = sample_images()
    else:
        from chestxray.inference.predict import collect_inputs

        files = collect_inputs(paths)
    files = files[:limit]
    if not files:
        raise ExportError(f"no images to check the export on in {', '.join(map(str, paths or []))}")
    preset = EvalPreset(preprocessing)
    return [str(p) for p in files], preset.batch([read_image(p) for p in files])


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter's optimiser logs every pass at INFO; keep warnings and errors only."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def capture_output(layer: Any) -> Iterator[dict[str, Any]]:
    """`store["out"]` is `layer`'s output in the forward passes inside the block (None: nothing hooked)."""
    store: dict[str, Any] = {}
    handle = None if layer is None else layer.register_forward_hook(lambda _m, _a, out: store.update(out=out))
    try:
        yield store
    finally:
        if handle is not None:
            handle.remove()


def cam_equivalent_layer(model: Any, size: int) -> Any:
    """The Grad-CAM layer of `model` when its head is one linear layer on the spatial mean of
    that layer's output (ResNets, for example), else None. Then d logit_k / d A_c(i, j) =
    W_kc / (h w) everywhere, so Grad-CAM's channel weights are W_kc / (h w) and its map is
    ReLU(sum_c W_kc A_c) / (h w): the class's weights applied to the feature maps (CAM), which
    the graph can output without gradients. Checked on a probe image, not assumed from the name."""
    import torch

    from chestxray.inference.features import capture_head_input, head_layer
    from chestxray.models.registry import cam_target_layer

    try:
        layer, head = cam_target_layer(model), head_layer(model)
    except Exception:  # an ensemble, or a model without a known CAM layer or head
        return None
    if not isinstance(head, torch.nn.Linear):
        return None
    probe = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    maps: dict[str, Any] = {}
    # A copy: a later in-place op (DenseNet's ReLU) would otherwise change what was captured.
    handle = layer.register_forward_hook(lambda _m, _a, out: maps.update(out=out.detach().clone()))
    try:
        with torch.inference_mode(), capture_head_input(model) as pooled:
            model(probe)
    finally:
        handle.remove()
    out = maps.get("out")
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or "features" not in pooled:
        return None
    mean = out.float().mean(dim=(2, 3))
    if mean.shape != pooled["features"].shape or not torch.allclose(
        mean, pooled["features"].float(), atol=1e-5, rtol=1e-4
    ):
        return None  # e.g. a ReLU between the layer and the pooling (DenseNet): Grad-CAM is not CAM there
    return layer


def to_onnx_model(
    model: Any,
    preprocessing: Preprocessing,
    opset: int = DEFAULT_OPSET,
    calibration: Any = None,
    input_check: Any = None,
):
    """The torch model + sigmoid as an onnx.ModelProto with a dynamic batch axis; with the
    bundle's calibrator on the logits and, when it has an input check, its score as a
    second output (features taken by the same head hook as the torch backend)."""
    _torch_modules()
    import torch

    from chestxray.inference.features import HEAD, capture_features, head_layer
    from chestxray.models.ensemble import ARCHITECTURE as ENSEMBLE

    class WithSigmoid(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net
            self.calibrated = calibration is not None
            if calibration is not None:
                a, b = calibration.torch_params()
                self.register_buffer("cal_a", a)
                self.register_buffer("cal_b", b)
            self.score = input_check.torch_module() if input_check is not None else None
            # One network: its pooled feature vector as an output too, for `Analyzer.embed` without torch.
            self.features = getattr(net, "architecture", ENSEMBLE) != ENSEMBLE
            self.cam_layer = cam_equivalent_layer(net, preprocessing.size) if self.features else None
            if self.cam_layer is not None:
                weight = head_layer(net).weight.detach().float()[:, :, None, None].clone()
                self.register_buffer("cam_weight", weight)
                self.cam_weight: torch.Tensor = weight

        def forward(self, image: Any) -> Any:
            layers = ([HEAD] if self.features else []) + (list(input_check.layers) if self.score is not None else [])
            if not layers:
                return self._probs(self.net(image))
            with (
                capture_features(self.net, list(dict.fromkeys(layers))) as store,
                capture_output(self.cam_layer) as maps,
            ):
                logits = self.net(image)
            outs = [self._probs(logits)]
            if self.features:
                outs.append(store[HEAD])
            if self.score is not None:
                outs.append(self.score(store))
            if self.cam_layer is not None:
                # The head's weights at every position of the last block (a 1x1 convolution): CAM,
                # which for this head is Grad-CAM up to a positive factor (see cam_equivalent_layer).
                outs.append(torch.nn.functional.conv2d(maps["out"].float(), self.cam_weight))
            return tuple(outs)

        def _probs(self, logits: Any) -> Any:
            if self.calibrated:
                logits = logits * self.cal_a + self.cal_b
            return torch.sigmoid(logits)

    wrapped = WithSigmoid(model).eval().cpu()
    outputs = (
        [OUTPUT_NAME]
        + ([FEATURES_NAME] if wrapped.features else [])
        + ([SCORE_NAME] if wrapped.score is not None else [])
        + ([CAM_NAME] if wrapped.cam_layer is not None else [])
    )
    size = preprocessing.size
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet_exporter_logs():
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_shapes={"image": {0: batch}},
                external_data=False,
            )
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {type(exc).__name__}: {exc}") from None
    if program is None:  # only with dynamo=False, which is never used here
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    written = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if written != {opset}:
        # The exporter writes opset 18 or newer and does not convert down.
        raise ExportError(
            f"the exporter wrote opset {', '.join(map(str, sorted(written)))}, not {opset}; "
            f"choose opset={MIN_OPSET} or newer"
        )
    # The exporter names the symbolic axis after the Dim; make it read "batch" for any tool.
    for value in (*proto.graph.input, *proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = "batch"
    return proto


def session_for(model_bytes: bytes) -> Any:
    """An onnxruntime session on the exported graph (the backend's own set-up)."""
    try:
        return ort_session(model_bytes)
    except BundleError as exc:
        raise ExportError(f"{exc}; try a lower opset=") from None


def check_parity(
    model: Any,
    session: Any,
    names: list[str],
    batch: np.ndarray,
    thresholds: Sequence[float],
    tolerance: float | None = DEFAULT_TOLERANCE,
    calibration: Any = None,
    input_check: Any = None,
) -> ParityReport:
    """Run the check images through onnxruntime (as one batch, then the first alone, which
    exercises the dynamic batch axis) and through the PyTorch model; compare probabilities
    (calibrated, when the bundle has a calibrator) and input-check scores (relative)."""
    from chestxray.inference.predict import TorchBackend

    ref, ref_scores = TorchBackend(model, "cpu", calibration, input_check).run(batch)
    inp = session.get_inputs()[0].name
    # Outputs by name: the graph may also give features and the input check's score.
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {inp: batch})))
    full = outs[OUTPUT_NAME]
    single = session.run([OUTPUT_NAME], {inp: batch[:1]})[0]
    diff = max(float(np.max(np.abs(full - ref))), float(np.max(np.abs(single - ref[:1]))))
    score_diff = None
    if ref_scores is not None and SCORE_NAME in outs:
        score_diff = float(np.max(np.abs(outs[SCORE_NAME] - ref_scores) / np.maximum(np.abs(ref_scores), 1e-6)))
    if not np.isfinite(diff):
        diff = float("inf")
    thr = np.asarray(thresholds)[None, :]
    agree = int(np.sum((full >= thr) == (ref >= thr)))
    sizes = sorted({len(batch), 1}, reverse=True)
    report = ParityReport(diff, [Path(n).name for n in names], sizes, agree, int(ref.size), tolerance=tolerance)
    report.score_max_rel_diff = score_diff
    if CAM_NAME in outs:
        report.cam_max_abs_diff = cam_difference(model, batch, outs[CAM_NAME])
    return report


def cam_difference(model: Any, batch: np.ndarray, cams: np.ndarray) -> float:
    """Largest difference between torch's Grad-CAM and the graph's class activation maps
    (ReLU, scaled to [0, 1] as the overlays are), over the images and every finding, on the
    target layer's grid (the upsampling after it is the same code for both). A map whose
    positive part is below 1e-3 of the image's largest map value is left out: scaled to
    [0, 1], float rounding alone decides its shape, in torch as in the graph."""
    from chestxray.inference.explain import gradcam, normalize_map

    worst = 0.0
    grid = (int(cams.shape[-2]), int(cams.shape[-1]))
    for x, maps in zip(batch, cams):
        ref = gradcam(model, x, list(range(len(maps))), grid)
        floor = 1e-3 * float(np.max(np.abs(maps)))
        for k, want in zip(ref.indices, ref.maps):
            if float(np.max(maps[k])) <= floor:
                continue
            worst = max(worst, float(np.max(np.abs(normalize_map(maps[k]) - want))))
    return worst if np.isfinite(worst) else float("inf")


def metadata_props(
    meta: BundleMeta, *, opset: int, quantization: str, parity: ParityReport, source: Path | None, cam: bool = False
) -> dict[str, str]:
    """The metadata_props written into the ONNX file: the whole bundle JSON plus readable keys."""
    import onnx
    import onnxruntime
    import torch

    from chestxray import NOT_FOR_CLINICAL_USE, __version__

    size = meta.preprocessing.size
    props = {
        META_KEY: meta.to_json(),
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "name": meta.name,
        "architecture": meta.architecture,
        "labels": json.dumps(list(meta.labels)),
        "thresholds": json.dumps({lab: float(t) for lab, t in zip(meta.labels, meta.thresholds)}),
        "preprocessing": json.dumps(meta.preprocessing.to_dict()),
        "metrics": json.dumps(meta.metrics),
        "input": f"{INPUT_NAME}: float32 (N, 1, {size}, {size}), gray in [0, 1]: "
        + ("centre crop to square, " if meta.preprocessing.crop == "center" else "")
        + f"resize to {size} x {size} ({meta.preprocessing.resize}), then /255 (chestxray.data.transforms.EvalPreset)"
        + (f"; the graph then applies {meta.preprocessing.scaling}" if meta.preprocessing.scaling else ""),
        "output": f"{OUTPUT_NAME}: float32 (N, {len(meta.labels)}), sigmoid applied, in the order of 'labels'"
        + (", calibrated per finding (see 'chestxray' calibration)" if meta.calibration else "")
        + ("" if meta.architecture == "ensemble" else f"; {FEATURES_NAME}: float32 (N, D), pooled feature vector")
        + (f"; {SCORE_NAME}: float32 (N,), the input check's score" if meta.input_check else "")
        + (
            f"; {CAM_NAME}: float32 (N, {len(meta.labels)}, h, w), class activation maps of the last block "
            "(Grad-CAM after ReLU and scaling to [0, 1])"
            if cam
            else ""
        ),
        "quantization": quantization,
        "parity": json.dumps(parity.to_dict()),
        "exported": json.dumps(
            {
                "chestxray": __version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "opset": opset,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
        ),
        "notes": NOT_FOR_CLINICAL_USE,
    }
    if source is not None:
        props["source_bundle"] = json.dumps({"file": source.name, "sha256": file_sha256(source)})
    return props


def set_metadata(proto: Any, props: dict[str, str]) -> None:
    from chestxray import NOT_FOR_CLINICAL_USE

    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*keep, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "chestxray"
    proto.doc_string = (
        f"{props.get('name', '')}: multi-label chest X-ray classifier (NIH ChestX-ray14 "
        f"findings). {NOT_FOR_CLINICAL_USE}"
    )


def _serialize(proto: Any) -> bytes:
    data = proto.SerializeToString()
    if len(data) >= 2**31 - 1:  # pragma: no cover - no model in the registry comes near
        raise ExportError("model is over 2 GB; ONNX external data is not supported by this exporter")
    return data


def export_bundle(
    bundle: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    check_images: Sequence[str | os.PathLike] | None = None,
    int8: bool = False,
    calibration: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    calibration_count: int = 64,
    calibration_method: str = "minmax",
    seed: int = 0,
    say: Callable[[str], None] = lambda s: None,
) -> ExportResult:
    """Bundle (None: the packaged default) -> ONNX file at `out`, checked, written atomically.

    int8: quantize (onnxruntime static, QDQ, calibrated on `calibration` images through the
    eval preset) after the float32 graph passed its check; the int8 file's own difference
    to PyTorch is reported, not bounded (its acceptance test is the AUROC comparison in
    benchmarks/inference.py --compare-auroc).
    """
    start = time.perf_counter()
    _torch_modules()
    from chestxray.inference.predict import default_bundle_path
    from chestxray.io import atomic_write_bytes
    from chestxray.models.bundle import load_bundle, resolve_bundle_path

    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"{out}: the output file should end in .onnx")
    if opset < MIN_OPSET:
        raise ExportError(
            f"opset={opset}: the exporter writes opset {MIN_OPSET} or newer (onnxruntime >= 1.14 runs {MIN_OPSET})"
        )
    if int8 and calibration is None:
        raise ExportError(
            "int8=True needs calibration=DIR: real radiographs (e.g. training images) "
            "to calibrate the activation ranges on"
        )
    source = resolve_bundle_path(bundle) if bundle is not None else default_bundle_path()
    model, meta = load_bundle(source)
    names, batch = load_check_images(check_images, meta.preprocessing)
    say(
        f"exporting {meta.name} ({meta.architecture}, {meta.preprocessing.size} px, {len(meta.labels)} labels) "
        f"from {source} at opset {opset}"
    )
    from chestxray.inference.calibration import calibration_of
    from chestxray.inference.input_check import load_input_check

    # (`calibration` is this function's int8 image source; the bundle's calibrator is `calibrator`.)
    calibrator, input_check = calibration_of(meta), load_input_check(meta, source)
    extras = {k: v for k, v in (("calibration", calibrator), ("input_check", input_check)) if v is not None}
    proto = to_onnx_model(model, meta.preprocessing, opset, **extras)
    data = _serialize(proto)
    checks = {"calibration": calibrator, "input_check": input_check}
    parity = check_parity(model, session_for(data), names, batch, meta.thresholds, tolerance, **checks)
    say(f"float32 check: {parity.describe()}")
    if not parity.ok:
        what = f"max difference {parity.max_abs_diff:.2e}"
        if parity.cam_max_abs_diff is not None and parity.cam_max_abs_diff > tolerance:
            what = f"Grad-CAM maps differ by {parity.cam_max_abs_diff:.2e}"
        raise ExportError(
            f"onnxruntime and PyTorch disagree: {what} > tolerance {tolerance:.0e} on {', '.join(parity.images)}; "
            f"{out} was not written"
        )
    quantization, float_parity = "none (float32)", None
    if int8 and calibration is not None:  # None was refused above
        from chestxray.export.quantize import calibration_images, quantize_int8

        float_parity = parity
        cal = calibration_images(calibration, calibration_count, seed=seed)
        where = calibration if isinstance(calibration, (str, os.PathLike)) else "the given files"
        say(f"calibrating int8 on {len(cal)} images from {where} ({calibration_method})")
        with tempfile.TemporaryDirectory(prefix="chestxray-int8-") as tmp:
            fp = Path(tmp) / "float32.onnx"
            fp.write_bytes(data)
            q = Path(tmp) / "int8.onnx"
            quantize_int8(fp, q, cal, meta.preprocessing, method=calibration_method)
            import onnx

            proto = onnx.load(str(q))
        data = _serialize(proto)
        parity = check_parity(model, session_for(data), names, batch, meta.thresholds, None, **checks)
        say(f"int8 check: {parity.describe()}")
        quantization = (
            f"int8 static (onnxruntime QDQ, per-channel int8 weights, uint8 activations), "
            f"calibrated ({calibration_method}) on {len(cal)} images"
        )
    cam = any(o.name == CAM_NAME for o in proto.graph.output)
    props = metadata_props(meta, opset=opset, quantization=quantization, parity=parity, source=source, cam=cam)
    set_metadata(proto, props)
    data = _serialize(proto)
    atomic_write_bytes(out, data)
    return ExportResult(out, len(data), opset, quantization, parity, float_parity, time.perf_counter() - start, props)
