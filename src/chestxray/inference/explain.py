"""Grad-CAM (Selvaraju et al., 2017) for the findings of one image, and overlays.

`explain(analyzer, image)` runs the bundle's network once, with gradients, and gives
the Prediction plus one heat map per finding asked for, each at the size and aspect of
the ORIGINAL image and scaled to [0, 1].

Why an own implementation and not pytorch-grad-cam: the whole method is ~30 lines
here, and owning it lets us (a) take the CAMs of several findings from ONE forward
pass (one `torch.autograd.grad` per finding on the retained graph, gradients of the
activations only, no parameter `.grad` touched), (b) hook only the thread that asked,
so a web server sharing one model between threads cannot mix up two requests, and
(c) guarantee the hook is removed on every exit path (a context manager), without a
further dependency.

Geometry: the eval preset resizes the whole image (no padding, no flip; a centre crop only
for models that ask for one, e.g. torchxrayvision's, whose maps then cover that square and
are zero outside it) to S x S, so the target layer's h x w grid covers the whole image; bilinear upsampling
with `align_corners=False` maps cell centres onto the centres of their footprints in
the original, in its own aspect. A map is ReLU'd and divided by its maximum (0 stays
"no positive evidence"); a map with no positive evidence is all zeros.

Without torch: an ONNX file exported with a "cam" output (a ResNet-like head: one linear
layer on the pooled last block, where Grad-CAM equals CAM) gives the same maps from one
onnxruntime pass (`onnx_gradcam`); upsampling and the colour map are numpy, so the
`[infer]` install draws the same overlays.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from chestxray.data.images import source_name, to_gray
from chestxray.errors import ChestXrayError
from chestxray.labels import ALIASES

if TYPE_CHECKING:  # torch is optional for the light inference install
    import torch

    from chestxray.inference.predict import Analyzer, Input, Prediction

DEFAULT_ALPHA = 0.45
COLORMAP = "jet"


@dataclass
class FindingTarget:
    """CAM target: the logit of one finding (pytorch-grad-cam's ClassifierOutputTarget)."""

    index: int

    def __call__(self, logits: "torch.Tensor") -> "torch.Tensor":
        # (C,) -> scalar; (N, C) -> (N,)
        return logits[..., self.index]


@dataclass
class CamResult:
    finding: str
    probability: float
    heatmap: np.ndarray  # float32, H x W of the original image, values in [0, 1]

    @property
    def has_evidence(self) -> bool:
        """False when no region raised the score (the ReLU'd map is all zeros)."""
        return bool(np.any(self.heatmap > 0))

    @property
    def note(self) -> str | None:
        """What to say instead of showing a flat map, or None when there is a map to show."""
        return None if self.has_evidence else no_evidence_text(self.finding)


def no_evidence_text(finding: str) -> str:
    return f"no positive evidence for {finding}"


@dataclass
class CamRun:
    """What one Grad-CAM pass gives: probabilities of every label, the chosen label
    indices, their maps (original size) and the target layer's grid (h, w)."""

    probabilities: np.ndarray
    indices: list[int]
    maps: list[np.ndarray]
    grid: tuple[int, int]


@contextmanager
def capture_activations(layer: Any) -> Iterator[dict[str, Any]]:
    """Record `layer`'s output during forward passes run by this thread; the hook is
    removed when the block exits, also on error."""
    store: dict[str, Any] = {}
    owner = threading.get_ident()

    def hook(module: Any, inputs: Any, output: Any) -> None:
        if threading.get_ident() == owner:
            store["activations"] = output

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _device_of(model: Any) -> "torch.device":
    import torch

    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def gradcam(
    model: Any,
    model_input: np.ndarray,
    select: Sequence[int] | Callable[[np.ndarray], Sequence[int]],
    size: tuple[int, int],
    calibration: Any = None,
) -> CamRun:
    """Grad-CAM maps of several labels of one image from one forward pass.

    model_input: the eval preset's (1, S, S) or (1, 1, S, S) float32 array.
    select: label indices, or a function of the probabilities that returns them.
    size: (H, W) of the original image; every map is upsampled to it.
    calibration: the bundle's Calibration, so the probabilities shown are the calibrated ones
    (the maps are gradients of the raw logits; a calibrator only rescales them per finding).
    """
    import torch

    from chestxray.models.registry import cam_target_layer

    layer = cam_target_layer(model)
    arr = np.array(model_input, dtype=np.float32, copy=True)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] != 1:
        raise ChestXrayError(f"Grad-CAM takes one image, shape (1, S, S); got {tuple(np.shape(model_input))}")
    # inference_mode(False) + enable_grad: works even when called inside no_grad or
    # inference_mode; the model stays in eval mode (BatchNorm uses running statistics).
    with torch.inference_mode(False), torch.enable_grad(), capture_activations(layer) as store:
        # The input requires grad so the activations do even if every weight is frozen.
        x = torch.from_numpy(arr).to(_device_of(model)).requires_grad_(True)
        logits = model(x)
        acts = store.get("activations")
        if not isinstance(acts, torch.Tensor):
            raise ChestXrayError("Grad-CAM: the target layer gave no tensor output in the forward pass")
        if calibration is not None:
            probs = calibration.apply_logits(logits.detach().float().cpu().numpy())[0]
        else:
            probs = torch.sigmoid(logits.detach().float())[0].cpu().numpy().astype(np.float64)
        indices = [int(i) for i in (select(probs) if callable(select) else select)]
        maps = []
        for k, idx in enumerate(indices):
            target = FindingTarget(idx)(logits)[0]
            (grads,) = torch.autograd.grad(target, acts, retain_graph=k < len(indices) - 1)
            weights = grads.float().mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
            cam = torch.relu((weights * acts.detach().float()).sum(dim=1))[0]  # (h, w)
            maps.append(upsample_map(cam.cpu().numpy(), size))
        grid = (int(acts.shape[-2]), int(acts.shape[-1]))
    return CamRun(probs, indices, maps, grid)


def upsample_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """h x w map -> (H, W) float32 in [0, 1]: bilinear (cell centres to footprint
    centres), negative values cut, divided by the maximum."""
    m = np.asarray(cam, dtype=np.float32)
    rows = _bilinear_matrix(int(size[0]), m.shape[0])
    cols = _bilinear_matrix(int(size[1]), m.shape[1])
    return normalize_map(rows @ m @ cols.T)


def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) weights of 1-D bilinear resampling as torch's interpolate(align_corners=False)
    computes it (source = (i + 0.5) * in / out - 0.5, clamped at 0), so the torch and the
    torch-free paths give the same maps; a separable matrix product on a tiny grid is
    exact and fast, where PIL would round through its own fixed kernels."""
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    out = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(out, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(out, (np.arange(out_size), hi), frac)
    return out.astype(np.float32)


def onnx_gradcam(
    backend: Any,
    model_input: np.ndarray,
    select: Sequence[int] | Callable[[np.ndarray], Sequence[int]],
    size: tuple[int, int],
) -> CamRun:
    """As `gradcam`, on an ONNX backend whose graph outputs class activation maps (which equal
    Grad-CAM for its head, see export/onnx.py). The probabilities are the graph's (calibrated
    when it has a calibrator)."""
    arr = np.asarray(model_input, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] != 1:
        raise ChestXrayError(f"Grad-CAM takes one image, shape (1, S, S); got {tuple(np.shape(model_input))}")
    probs, maps = backend.run_cam(arr)
    p = np.asarray(probs[0], dtype=np.float64)
    indices = [int(i) for i in (select(p) if callable(select) else select)]
    grid = (int(maps.shape[-2]), int(maps.shape[-1]))
    return CamRun(p, indices, [upsample_map(np.maximum(maps[0, i], 0.0), size) for i in indices], grid)


def check_cam_support(analyzer: "Analyzer") -> None:
    """ChestXrayError, before any work, when the analyzer's model cannot give Grad-CAM maps."""
    if analyzer.backend.has_cam:
        return
    if analyzer.backend.name == "onnx":
        raise ChestXrayError(
            "Grad-CAM on the onnx backend needs an ONNX file with a 'cam' output (export the bundle "
            "again with this version of chestxray; ResNet-like models only), or use the torch backend"
        )
    _ = analyzer.model  # ChestXrayError for a backend without a torch model


def uncrop_map(square: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map of an image's centred square (crop "center") placed in a map of the whole
    image (`size`), zero (no evidence) outside the square."""
    from chestxray.data.transforms import center_crop_box

    top, left, side = center_crop_box(int(size[0]), int(size[1]))
    if square.shape != (side, side):
        raise ChestXrayError(f"uncrop_map: map {square.shape} is not the {side} x {side} centre square of {size}")
    out = np.zeros(size, dtype=np.float32)
    out[top : top + side, left : left + side] = square
    return out


def normalize_map(heatmap: np.ndarray) -> np.ndarray:
    """ReLU, then divide by the maximum; all zeros when nothing is positive."""
    m = np.maximum(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0)
    top = float(m.max()) if m.size else 0.0
    if top <= 0.0:
        return np.zeros(m.shape, dtype=np.float32)
    return np.clip(m / top, 0.0, 1.0).astype(np.float32)


def resolve_findings(labels: Sequence[str], findings: Sequence[str] | None) -> list[int] | None:
    """Label indices of `findings` (exact, case-insensitive, or NIH side-file spelling
    such as "Infiltrate"); None stays None. Unknown names: ChestXrayError listing the valid ones."""
    if findings is None:
        return None
    by_name = {lab.lower(): i for i, lab in enumerate(labels)}
    aliases = {k.lower(): v for k, v in ALIASES.items()}
    out: list[int] = []
    unknown: list[str] = []
    for raw in findings:
        name = raw.strip()
        name = aliases.get(name.lower(), name)
        i = by_name.get(name.lower())
        if i is None:
            unknown.append(raw)
        elif i not in out:
            out.append(i)
    if unknown:
        raise ChestXrayError(
            f"unknown finding{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid findings: {', '.join(labels)}"
        )
    return out


def top_finding(probs: np.ndarray) -> list[int]:
    """The single most probable finding (the report's choice)."""
    return [int(np.argmax(probs))]


def default_selection(thresholds: Sequence[float] | np.ndarray) -> Callable[[np.ndarray], list[int]]:
    """The positive findings (most probable first), or the single most probable one."""
    thr = np.asarray(thresholds, dtype=np.float64)

    def select(probs: np.ndarray) -> list[int]:
        positive = np.flatnonzero(probs >= thr)
        if positive.size:
            return [int(i) for i in positive[np.argsort(-probs[positive], kind="stable")]]
        return [int(np.argmax(probs))]

    return select


def explain_image(
    analyzer: "Analyzer",
    image: "Input",
    findings: Sequence[str] | None = None,
    name: str | None = None,
    *,
    select: Callable[[np.ndarray], Sequence[int]] | None = None,
) -> tuple[np.ndarray, "Prediction", list[CamResult]]:
    """As `explain`, plus the decoded gray image (H x W uint8) the maps belong to: the one
    "preprocess -> Grad-CAM -> Prediction" path of the CLI, the server and the report.
    `select` (a function of the probabilities, e.g. `top_finding`) replaces the default
    choice when `findings` is None."""

    check_cam_support(analyzer)
    wanted = resolve_findings(analyzer.labels, findings)
    label = source_name(image, name, default="<input>")
    gray, x = analyzer.preprocess(image, label)
    chosen: Sequence[int] | Callable[[np.ndarray], Sequence[int]]
    if wanted is not None:
        chosen = wanted
    else:
        chosen = select if select is not None else default_selection(analyzer.thresholds)
    crop = analyzer.preprocessing.crop == "center"
    side = min(gray.shape[:2])
    size = (side, side) if crop else gray.shape[:2]
    if analyzer.backend.has_cam:  # ONNX: the graph's class activation maps
        run = onnx_gradcam(analyzer.backend, x, chosen, size)
    else:
        run = gradcam(analyzer.model, x, chosen, size, analyzer.backend.calibrator)
    # The checks (input check, orientation) come from one more gradient-free pass, only when the model has them.
    checks = None
    if analyzer.has_checks:
        scores = analyzer.run(x[None])[1]
        checks = scores[0] if scores is not None else None
    if crop:  # the model saw the centred square only
        run.maps = [uncrop_map(m, gray.shape[:2]) for m in run.maps]
    warnings = analyzer.warnings_for(image, label, checks)
    prediction = analyzer.result(label, analyzer.findings_from(run.probabilities), warnings=warnings)
    cams = [CamResult(analyzer.labels[i], float(run.probabilities[i]), m) for i, m in zip(run.indices, run.maps)]
    return gray, prediction, cams


def explain(
    analyzer: "Analyzer", image: "Input", findings: Sequence[str] | None = None, name: str | None = None
) -> tuple["Prediction", list[CamResult]]:
    """Prediction and Grad-CAM maps for one image (path, bytes or gray array).

    findings None -> the positive findings (most probable first), or the single most
    probable finding when none is positive. An unknown name raises ChestXrayError
    listing the valid names; an unreadable image raises ImageReadError.
    """
    _, prediction, cams = explain_image(analyzer, image, findings, name)
    return prediction, cams


# matplotlib's "jet" as its segment data (matplotlib/_cm.py): (x, value) knots per channel,
# linear between them. A table of 13 knots keeps the overlay free of matplotlib, which the
# torch-free `[infer]` install does not have; tests check it against matplotlib's own LUT.
_JET_KNOTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _colormap_lut(name: str = COLORMAP) -> np.ndarray:
    """(256, 3) float32 RGB in 0-255 of the overlay's colour map (jet), interpolated between
    the knots in the order matplotlib's _create_lookup_table uses, so the rounding matches too."""
    if name != COLORMAP:
        raise ChestXrayError(f"unknown colour map {name!r}; only {COLORMAP!r} is built in")
    n = 256
    at = np.linspace(0.0, 1.0, n) * (n - 1)
    channels = []
    for c in ("red", "green", "blue"):
        xk = np.array([k[0] for k in _JET_KNOTS[c]]) * (n - 1)
        yk = np.array([k[1] for k in _JET_KNOTS[c]], dtype=np.float64)
        ind = np.searchsorted(xk, at)[1:-1]
        distance = (at[1:-1] - xk[ind - 1]) / (xk[ind] - xk[ind - 1])
        inner = distance * (yk[ind] - yk[ind - 1]) + yk[ind - 1]
        channels.append(np.clip(np.concatenate([[yk[0]], inner, [yk[-1]]]), 0.0, 1.0))
    return np.rint(np.stack(channels, axis=1) * 255.0).astype(np.float32)


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """The heat map in a colormap (jet: blue = 0, red = 1) blended over the radiograph:
    H x W x 3 uint8, same size as `gray`. A map with no positive value gives the plain
    radiograph (a uniform blue tint would look like a bug); say `no_evidence_text` beside it."""
    gray = to_gray(np.asarray(gray))
    if gray.shape != heatmap.shape:
        raise ChestXrayError(f"overlay: image {gray.shape} and heat map {heatmap.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ChestXrayError(f"overlay: alpha must lie in [0, 1], got {alpha}")
    if not np.any(np.nan_to_num(heatmap) > 0):
        return np.repeat(gray[..., None], 3, axis=2)
    codes = np.rint(np.clip(np.nan_to_num(heatmap), 0.0, 1.0) * 255.0).astype(np.uint8)
    heat = _colormap_lut()[codes]
    base = gray.astype(np.float32)[..., None]
    out = (1.0 - alpha) * base + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def draw_caption(rgb: np.ndarray, text: str) -> np.ndarray:
    """A copy of `rgb` (H x W x 3 uint8) with `text` in white on a dark band at the top."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("RGB")
    h = img.height
    size = max(10, min(48, h // 40))
    band = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(band)
    while True:
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has a single bitmap size
            font = ImageFont.load_default()
        pad = max(2, size // 4)
        left, _, right, bottom = draw.textbbox((pad, pad), text, font=font)
        if right + pad <= img.width or size <= 8:  # shrink the font until the caption fits
            break
        size = max(8, int(size * (img.width - 2 * pad) / (right - left + 1)))
    draw.rectangle((0, 0, img.width, bottom + pad), fill=(0, 0, 0, 170))
    draw.text((pad, pad), text, fill=(255, 255, 255, 255), font=font)
    return np.asarray(Image.alpha_composite(img.convert("RGBA"), band).convert("RGB"))


def cam_caption(cam: CamResult, model_name: str, threshold: float | None = None) -> str:
    thr = f" (threshold {threshold:.2f})" if threshold is not None else ""
    what = f"Grad-CAM: {cam.note}" if cam.note else "Grad-CAM"
    return f"{cam.finding} {cam.probability:.2f}{thr} | {what} | {model_name} | not for clinical use"


def colour_bar(width: int, height: int | None = None) -> np.ndarray:
    """The overlay's colour scale as an RGB strip (H x W x 3 uint8) with its ends named,
    the same LUT as `overlay` and the viewer's legend: blue = no evidence, red = strongest."""
    from PIL import Image, ImageDraw, ImageFont

    h = height or max(18, min(60, width // 30))
    lut = _colormap_lut()
    strip = np.repeat(lut[np.linspace(0, 255, width).astype(np.int64)][None], h, axis=0)
    img = Image.fromarray(np.clip(np.rint(strip), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=max(8, int(h * 0.6)))
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        font = ImageFont.load_default()
    pad = max(2, h // 5)
    right = "strongest evidence (1)"
    draw.text((pad, pad // 2), "no evidence (0)", fill=(255, 255, 255), font=font)
    r = draw.textbbox((0, 0), right, font=font)[2]
    draw.text((width - r - pad, pad // 2), right, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def with_colour_bar(rgb: np.ndarray) -> np.ndarray:
    """`rgb` with the colour scale appended below it, as the viewer shows beside its overlays."""
    bar = colour_bar(rgb.shape[1])
    return np.concatenate([np.asarray(rgb, dtype=np.uint8), bar], axis=0)
