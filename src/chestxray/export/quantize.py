"""int8 static quantization of an exported float32 ONNX file (onnxruntime), calibrated on
real radiographs read and preprocessed exactly as at prediction time (`read_image` +
`EvalPreset`), and the AUROC comparison that decides whether an int8 file is kept.

Torch-free: needs onnx and onnxruntime (`pip install chestxray[export]`). An int8 model
is kept only if it loses at most 0.005 mean AUROC against float32 on held-out labelled
images (`compare_auroc`, run by `benchmarks/inference.py --compare-auroc ROOT`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.data.images import read_image
from chestxray.data.transforms import EvalPreset, Preprocessing
from chestxray.errors import ChestXrayError
from chestxray.inference.onnx_backend import CAM_NAME, INPUT_NAME, OUTPUT_NAME, SCORE_NAME

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
AUROC_BUDGET = 0.005


def calibration_images(
    source: str | os.PathLike | Sequence[str | os.PathLike], count: int = 64, seed: int = 0
) -> list[Path]:
    """A seeded sample of `count` images from a folder (recursive) or a list of files."""
    from chestxray.inference.predict import collect_inputs

    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    for item in items:
        if not Path(item).exists():
            raise ChestXrayError(f"{item}: calibration folder or image not found")
    files = collect_inputs(items)
    if not files:
        raise ChestXrayError(f"{', '.join(map(str, items))}: no PNG, JPEG or DICOM images to calibrate on")
    if count <= 0:
        raise ChestXrayError(f"calibration count must be positive, got {count}")
    if len(files) > count:
        pick = np.random.default_rng(seed).choice(len(files), size=count, replace=False)
        files = [files[i] for i in sorted(pick)]
    return files


def _reader(files: Sequence[Path], preprocessing: Preprocessing, batch_size: int):
    """Calibration batches read through the eval preset. `set_range` lets onnxruntime
    collect one batch at a time (CalibStridedMinMax), so memory holds one batch of
    activations even for the histogram methods, which keep whole tensors."""
    from onnxruntime.quantization import CalibrationDataReader

    preset = EvalPreset(preprocessing)
    chunks = [list(files[i : i + batch_size]) for i in range(0, len(files), batch_size)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pos, self.end = 0, len(chunks)

        def __len__(self) -> int:
            return len(chunks)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pos, self.end = start_index, min(end_index, len(chunks))

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.pos >= self.end:
                return None
            chunk = chunks[self.pos]
            self.pos += 1
            return {INPUT_NAME: preset.batch([read_image(p) for p in chunk])}

        def rewind(self) -> None:
            self.pos, self.end = 0, len(chunks)

    return Reader()


def quantize_int8(
    float_model: str | os.PathLike,
    out: str | os.PathLike,
    images: Sequence[Path],
    preprocessing: Preprocessing,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool = False,
    batch_size: int = 8,
) -> Path:
    """float32 ONNX file -> int8 QDQ ONNX file (uint8 activations, int8 weights).

    `reduce_range` (7-bit weights) avoids accumulator saturation on x86 CPUs without VNNI
    at a small accuracy cost; without it the file is most accurate on VNNI CPUs and ARM.
    """
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ChestXrayError(
            f"int8 quantization needs onnx and onnxruntime ({exc}): pip install 'chestxray[export]'"
        ) from None
    methods = dict(
        zip(CALIBRATION_METHODS, (CalibrationMethod.MinMax, CalibrationMethod.Percentile, CalibrationMethod.Entropy))
    )
    if method not in methods:
        raise ChestXrayError(f"unknown calibration method {method!r}; choose one of {', '.join(methods)}")
    float_model, out = Path(float_model), Path(out)
    prepared = out.with_name(out.stem + ".prepared.onnx")
    try:
        # Shape inference + graph optimisation (BatchNorm folding etc.) first, as onnxruntime advises.
        quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        extra: dict[str, Any] = {"CalibStridedMinMax": 1}  # one reader batch at a time (any method)
        if method == "percentile":
            extra["CalibPercentile"] = 99.999
        quantize_static(
            str(prepared),
            str(out),
            _reader(list(images), preprocessing, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options=extra,
            nodes_to_exclude=score_only_nodes(prepared),
        )
    finally:
        prepared.unlink(missing_ok=True)
        for aux in out.parent.glob("augmented_model*.onnx"):  # left by some onnxruntime versions
            aux.unlink(missing_ok=True)
    return out


def score_only_nodes(path: Path) -> list[str]:
    """Nodes that feed only the input-check score or the Grad-CAM maps (if any), not the
    probabilities: kept in float32, since int8 would coarsen a distance whose cut-off was set
    in float, and the maps' weighting (the last block's activations stay int8)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    names = [o.name for o in graph.output]
    side = [n for n in (SCORE_NAME, CAM_NAME) if n in names]
    if not side:
        return []
    producer = {out: node for node in graph.node for out in node.output}

    def ancestors(name: str) -> set[str]:
        seen: set[str] = set()
        stack = [name]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    return sorted(set().union(*map(ancestors, side)) - ancestors(OUTPUT_NAME))


@dataclass
class AurocComparison:
    """Per-class and mean AUROC of several models on one labelled image set."""

    images: int
    labels: list[str]
    per_class: dict[str, list[float | None]]  # model name -> AUROC per label (None: one class only)
    mean: dict[str, float]
    reference: str
    budget: float = AUROC_BUDGET

    def loss(self, name: str) -> float:
        """Mean AUROC lost by `name` against the reference (positive = worse)."""
        return self.mean[self.reference] - self.mean[name]

    def keep(self, name: str) -> bool:
        return self.loss(name) <= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "reference": self.reference,
            "budget": self.budget,
            "mean_auroc": self.mean,
            "per_class_auroc": self.per_class,
            "labels": self.labels,
            "loss_vs_reference": {n: self.loss(n) for n in self.mean if n != self.reference},
            "keep": {n: self.keep(n) for n in self.mean if n != self.reference},
        }


def compare_auroc(
    analyzers: dict[str, Any],
    root: str | os.PathLike,
    *,
    split: str = "test",
    reference: str | None = None,
    allow_missing: bool = True,
    progress: bool = False,
) -> AurocComparison:
    """Mean AUROC of each Analyzer on one split of an NIH root (labels from its CSV).

    Every analyzer sees the same images read the same way; classes with only one
    outcome on the split are left out of the mean (AUROC is undefined there).
    """
    from chestxray.data.index import load_nih
    from chestxray.evaluation.evaluate import split_probabilities
    from chestxray.evaluation.metrics import macro_mean, per_class_auroc

    if not analyzers:
        raise ChestXrayError("compare_auroc: no models to compare")
    reference = reference or next(iter(analyzers))
    index = load_nih(root, allow_missing=allow_missing)
    labels = list(next(iter(analyzers.values())).labels)
    per_class: dict[str, list[float | None]] = {}
    mean: dict[str, float] = {}
    images = 0
    for name, analyzer in analyzers.items():
        if list(analyzer.labels) != labels:
            raise ChestXrayError(f"{name}: label order {analyzer.labels} differs from {labels}")
        probs, targets, _, names = split_probabilities(analyzer, index, split, progress=progress)
        images = len(names)
        auc = per_class_auroc(targets, probs)
        per_class[name] = [None if not np.isfinite(a) else float(a) for a in auc]
        mean[name] = macro_mean(auc)
        if not np.isfinite(mean[name]):
            raise ChestXrayError(f"{root}: no finding has both positive and negative images in the {split} split")
    return AurocComparison(images, labels, per_class, mean, reference)
