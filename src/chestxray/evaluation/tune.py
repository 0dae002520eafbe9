"""Re-tune a bundle on labelled data without touching its weights: calibrator, operating
point (thresholds of a named policy) and, optionally, the input check's statistics.

Used by `chestxray tune`, at the end of training, and to re-ship the bundled model. The
new bundle's weight tensors are copied byte for byte from the old file; only the JSON
header (and the input check's own tensors) change, and the header records how.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.errors import ChestXrayError
from chestxray.evaluation.calibration import calibration_metrics, fit_calibration
from chestxray.evaluation.thresholds import tune_operating_point
from chestxray.inference.backend import Backend
from chestxray.io import file_sha256

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "temperature"  # chosen by measurement: MODEL_CARD.md "Calibration"
DEFAULT_POLICY = "f1"
# Beside the pooled features: the orientation check's thumbnails of the same images.
THUMBNAILS = "orientation.thumbnails"


class RecordingBackend(Backend):
    """Raw (uncalibrated) probabilities, keeping each batch's pooled features on the side."""

    name = "torch"

    def __init__(self, model: Any, features: bool = True) -> None:
        from chestxray.inference.features import input_check_layers

        self.model = model
        self.kept: list[dict[str, np.ndarray]] = []
        self.keep = features
        self.layers = input_check_layers(model) if features else []

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        from chestxray.inference.features import pooled_features
        from chestxray.inference.orientation import thumbnails

        if not self.keep:
            import torch

            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(batch)).to(next(self.model.parameters()).device)
                return torch.sigmoid(self.model(x).float()).cpu().numpy()
        logits, feats = pooled_features(self.model, batch, self.layers)
        self.kept.append({**feats, THUMBNAILS: thumbnails(batch)})
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


@dataclass
class SplitOutputs:
    probs: np.ndarray  # raw (uncalibrated)
    targets: np.ndarray
    patients: np.ndarray
    features: dict[str, np.ndarray] | None


def raw_split_outputs(
    model: Any, meta: Any, index: Any, split: str, features: bool, progress: bool = False
) -> SplitOutputs:
    from chestxray.evaluation.evaluate import split_probabilities
    from chestxray.inference.predict import Analyzer

    backend = RecordingBackend(model, features)
    analyzer = Analyzer(backend, meta.labels, meta.thresholds, meta.preprocessing, meta.name, None, 32)
    probs, targets, patients, _ = split_probabilities(analyzer, index, split, progress=progress)
    feats = None
    if features and backend.kept:
        feats = {k: np.concatenate([f[k] for f in backend.kept]) for k in [*backend.layers, THUMBNAILS]}
    return SplitOutputs(probs, targets, patients, feats)


def check_no_overlap(index: Any, split: str, eval_index: Any, eval_split: str) -> None:
    """Refuse tuning data that shares patients with the data the result will be evaluated on."""
    tune_p = set(index.frame["patient_id"].iloc[index.split_positions(split)])
    eval_p = set(eval_index.frame["patient_id"].iloc[eval_index.split_positions(eval_split)])
    shared = tune_p & eval_p
    if shared:
        raise ChestXrayError(
            f"the {split} split of {index.root} shares {len(shared)} patients with the {eval_split} split of "
            f"{eval_index.root}: tuning on them would make that evaluation optimistic; tune on other patients"
        )


def fit_post_training(
    model: Any,
    meta: Any,
    val_probs: np.ndarray,
    val_targets: np.ndarray,
    *,
    source: str,
    calibrate: str = DEFAULT_CALIBRATION,
    policy: str = DEFAULT_POLICY,
    train_features: dict[str, np.ndarray] | None = None,
    val_features: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Fit calibrator + operating point (+ input check when features are given) into `meta`
    (in place); returns the input check's tensors to store beside the weights."""
    from chestxray.inference.input_check import fit_input_check

    cal = fit_calibration(val_probs, val_targets, meta.labels, calibrate, fitted_on=source)
    calibrated = cal.apply_probabilities(val_probs)
    thresholds, op = tune_operating_point(calibrated, val_targets, meta.labels, policy, source=source)
    meta.calibration = cal.to_dict()
    meta.operating_point = op
    meta.thresholds = [float(t) for t in thresholds]
    meta.threshold_method = (
        f"policy {policy} per finding on the {calibrate}-calibrated scores of {source}; "
        f"fallback {op['fallback_0.5']} -> 0.5 (no positive or no negative there)"
    )
    rows = ~np.isnan(np.asarray(val_targets, dtype=np.float64)).any(axis=1)
    meta.metrics = {
        **(meta.metrics or {}),
    }
    if rows.any():
        meta.metrics["calibration_on_fit_split"] = {
            "before": calibration_metrics(val_targets[rows], val_probs[rows], meta.labels)["macro"],
            "after": calibration_metrics(val_targets[rows], calibrated[rows], meta.labels)["macro"],
        }
    if train_features is None or val_features is None:
        return {}
    from chestxray.inference.orientation import fit_orientation

    train_features, val_features = dict(train_features), dict(val_features)
    train_thumbs, val_thumbs = train_features.pop(THUMBNAILS, None), val_features.pop(THUMBNAILS, None)
    if train_thumbs is not None:
        meta.orientation = fit_orientation(train_thumbs, val_thumbs, info={"fitted_on": source}).to_dict()
    check = fit_input_check(train_features, val_features, info={"fitted_on": source})
    meta.input_check = check.to_dict()
    return check.tensors()


def retune_bundle(
    bundle: str | Path,
    index: Any,
    split: str,
    out: str | Path,
    *,
    policy: str = DEFAULT_POLICY,
    calibrate: str = DEFAULT_CALIBRATION,
    input_check_split: str | None = None,
    eval_index: Any = None,
    eval_split: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Write a re-tuned copy of `bundle` (a .safetensors bundle, or an exported .onnx file:
    `retune_onnx`) to `out`; returns (path, summary)."""
    from chestxray.inference.predict import sniff_model_format

    if sniff_model_format(bundle) == "onnx" or (sniff_model_format(bundle) is None and str(bundle).endswith(".onnx")):
        return retune_onnx(
            bundle,
            index,
            split,
            out,
            policy=policy,
            calibrate=calibrate,
            input_check_split=input_check_split,
            eval_index=eval_index,
            eval_split=eval_split,
            progress=progress,
        )
    from safetensors.torch import load_file, save_file

    from chestxray.inference.input_check import TENSOR_PREFIX
    from chestxray.io import atomic_write
    from chestxray.models.bundle import META_KEY, load_bundle, resolve_bundle_path

    src = resolve_bundle_path(bundle)
    out = Path(out)
    if out.resolve() == src.resolve():
        raise ChestXrayError(f"out={str(out)!r}: choose a new file; the source bundle is kept as it is")
    if eval_split is not None:
        check_no_overlap(index, split, eval_index if eval_index is not None else index, eval_split)
    log.info("loading %s", src)
    model, meta = load_bundle(src, device=device)
    old_thresholds = list(meta.thresholds)
    want_features = input_check_split is not None
    if want_features and getattr(model, "architecture", "") == "ensemble":
        raise ChestXrayError("the input check needs a single model's pooled features, not an ensemble")
    if input_check_split is not None and eval_split is not None:
        check_no_overlap(index, input_check_split, eval_index if eval_index is not None else index, eval_split)
    val = raw_split_outputs(model, meta, index, split, want_features, progress)
    source = f"{Path(index.root).name}:{split} ({len(val.probs)} images, {len(set(val.patients))} patients)"
    train_feats = None
    if input_check_split is not None:
        log.info("input check: features of the %s split", input_check_split)
        train_feats = raw_split_outputs(model, meta, index, input_check_split, True, progress).features
    log.info("fitting the %s calibrator and the %s thresholds on %s", calibrate, policy, source)
    extra = fit_post_training(
        model,
        meta,
        val.probs,
        val.targets,
        source=source,
        calibrate=calibrate,
        policy=policy,
        train_features=train_feats,
        val_features=val.features,
    )
    if meta.input_check is not None and want_features:
        meta.input_check["fitted_on"] = f"{Path(index.root).name}:{input_check_split} (cut-off from {source})"
        if meta.orientation is not None:
            meta.orientation["fitted_on"] = f"{Path(index.root).name}:{input_check_split} (template)"
    record_tuning(
        meta, src, source, calibrate, policy, old_thresholds, "unchanged (tensors copied from the source bundle)"
    )
    log.info("writing %s", out)
    state = load_file(str(src))  # the weights exactly as stored (dtype kept)
    if want_features:
        import torch

        state = {k: v for k, v in state.items() if not k.startswith(TENSOR_PREFIX)}
        state.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in extra.items()})
    path = atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={META_KEY: meta.to_json()}))
    return path, tuning_summary(meta, old_thresholds)


def record_tuning(
    meta: Any, src: Path, source: str, calibrate: str, policy: str, old_thresholds: list[float], weights: str
) -> None:
    """How the model was re-tuned, into `meta.training["tuning"]` (the previous record nested)."""
    meta.training = {
        **meta.training,
        "tuning": {
            "command": "chestxray tune",
            "source_bundle": {"file": src.name, "sha256": file_sha256(src)},
            "data": source,
            "calibrate": calibrate,
            "threshold_policy": policy,
            "previous_thresholds": dict(zip(meta.labels, old_thresholds)),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "weights": weights,
            **({"previous_tuning": meta.training["tuning"]} if "tuning" in meta.training else {}),
        },
    }


def tuning_summary(meta: Any, old_thresholds: list[float]) -> dict[str, Any]:
    return {
        "thresholds": dict(zip(meta.labels, meta.thresholds)),
        "previous_thresholds": dict(zip(meta.labels, old_thresholds)),
        "calibration": meta.calibration,
        "operating_point": meta.operating_point,
        "input_check": meta.input_check,
        "orientation": {k: v for k, v in (meta.orientation or {}).items() if k != "template"} or None,
    }


def retune_onnx(
    model: str | Path,
    index: Any,
    split: str,
    out: str | Path,
    *,
    policy: str = DEFAULT_POLICY,
    calibrate: str = DEFAULT_CALIBRATION,
    input_check_split: str | None = None,
    eval_index: Any = None,
    eval_split: str | None = None,
    progress: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """`retune_bundle` for an exported .onnx file, without torch: the graph is copied as it
    is and only its metadata changes. The graph's output is mapped back to the network's
    raw probabilities (its baked-in calibrator, an affine map of the logit, undone), the
    calibrator and thresholds are fitted on them exactly as for a bundle, and the file
    records the graph's own calibrator (GRAPH_CALIBRATION) so that the ONNX backend applies
    the new one in its place. Raw probabilities come from float32 outputs: beyond about
    1e-7 of 0 or 1 they saturate, which moves a fit only by as much."""
    from chestxray.evaluation.evaluate import split_probabilities
    from chestxray.inference.calibration import Calibration, calibration_of
    from chestxray.inference.onnx_backend import (
        GRAPH_CALIBRATION,
        RETUNED_FORMAT_VERSION,
        OnnxBackend,
        resolve_onnx_path,
        with_onnx_props,
    )
    from chestxray.inference.predict import Analyzer
    from chestxray.io import atomic_write_bytes
    from chestxray.models.bundle import META_KEY

    src = resolve_onnx_path(model)
    out = Path(out)
    if out.resolve() == src.resolve():
        raise ChestXrayError(f"out={out}: choose a new file; the source model is kept as it is")
    if input_check_split is not None:
        raise ChestXrayError(
            "input_check_split=... refits the input check on a network's pooled features, which needs the "
            "PyTorch bundle: tune the .safetensors bundle (pip install 'chestxray[torch]') and export it again"
        )
    if eval_split is not None:
        check_no_overlap(index, split, eval_index if eval_index is not None else index, eval_split)
    backend = OnnxBackend(src)
    info, meta = backend.info, backend.info.meta
    if GRAPH_CALIBRATION in info.props:  # re-tuned before: the graph still holds the exported calibrator
        graph = Calibration.from_dict(json.loads(info.props[GRAPH_CALIBRATION]), meta.labels, str(src))
    else:
        graph = calibration_of(meta) or Calibration.identity(meta.labels)
    backend.post = None  # the graph's own output
    analyzer = Analyzer(backend, meta.labels, meta.thresholds, meta.preprocessing, meta.name, None, 32)
    probs, targets, patients, _ = split_probabilities(analyzer, index, split, progress=progress)
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    raw_logits = (np.log(p) - np.log1p(-p) - graph.b[None, :]) / graph.a[None, :]
    raw = 1.0 / (1.0 + np.exp(-raw_logits))
    old_thresholds = list(meta.thresholds)
    source = f"{Path(index.root).name}:{split} ({len(raw)} images, {len(set(patients))} patients)"
    log.info("fitting the %s calibrator and the %s thresholds on %s", calibrate, policy, source)
    fit_post_training(None, meta, raw, targets, source=source, calibrate=calibrate, policy=policy)
    record_tuning(meta, src, source, calibrate, policy, old_thresholds, "unchanged (ONNX graph copied as it is)")
    props = {
        **info.props,
        META_KEY: meta.to_json(),
        "format_version": str(RETUNED_FORMAT_VERSION),
        "thresholds": json.dumps({lab: float(t) for lab, t in zip(meta.labels, meta.thresholds)}),
        GRAPH_CALIBRATION: json.dumps(graph.to_dict()),
    }
    log.info("writing %s", out)
    path = atomic_write_bytes(out, with_onnx_props(src, props))
    OnnxBackend(path)  # the written file loads (and its calibrators compose), or a BundleError now
    return path, tuning_summary(meta, old_thresholds)


def batch_features(
    model: Any, batches: Any, prep: Any, desc: str = "input check features", progress: bool = True
) -> dict[str, np.ndarray]:
    """The input check's pooled features of every image a CacheBatches yields (rows, x_uint8, y)."""
    import torch

    from chestxray.inference.features import capture_features, input_check_layers
    from chestxray.inference.orientation import thumbnails
    from chestxray.inference.pipeline import Progress

    model.eval()
    layers = input_check_layers(model)
    out: dict[str, list[np.ndarray]] = {k: [] for k in [*layers, THUMBNAILS]}
    bar = Progress(getattr(batches, "n", None), desc=desc, every_s=10.0, enabled=progress)
    with torch.inference_mode(), capture_features(model, layers) as store:
        for _rows, xb, _yb in batches:
            x = prep(xb)
            model(x)
            for k in layers:
                out[k].append(store[k].float().cpu().numpy())
            out[THUMBNAILS].append(thumbnails(x))
            bar.update(len(xb))
    bar.close()
    return {k: np.concatenate(v) for k, v in out.items()}


def fit_after_training(
    model: Any,
    meta: Any,
    val_probs: np.ndarray,
    val_targets: np.ndarray,
    train_batches: Any,
    val_batches: Any,
    prep: Any,
    distributed: bool = False,
) -> dict[str, np.ndarray]:
    """The one call at the end of training: calibrator, operating point and (single
    process only; each DDP rank sees a shard) the input check, into `meta`."""
    source = f"{meta.training.get('dataset_root', 'the dataset')}:val ({len(val_probs)} images)"
    feats: dict[str, Any] = {}
    if not distributed and getattr(model, "architecture", "") != "ensemble":
        log.info("input check: pooled features of the train and val images")
        feats = {
            "train_features": batch_features(model, train_batches, prep, "input check: train features"),
            "val_features": batch_features(model, val_batches, prep, "input check: val features"),
        }
    else:
        log.info("input check not fitted (distributed run): fit it with `chestxray tune --input-check-split train`")
    log.info("fitting the calibrator, the operating point and the input check on %s", source)
    extra = fit_post_training(model, meta, val_probs, val_targets, source=source, **feats)
    if meta.input_check is not None:
        meta.input_check["fitted_on"] = f"{meta.training.get('dataset_root', 'the dataset')}:train (cut-off from val)"
    if meta.orientation is not None:
        meta.orientation["fitted_on"] = f"{meta.training.get('dataset_root', 'the dataset')}:train (template)"
    return extra
