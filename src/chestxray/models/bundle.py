"""The model bundle: one `.safetensors` file holding the weights and, in its header
metadata, a JSON document that describes them (architecture, label order,
preprocessing, thresholds, training data and split, validation metrics, versions).

No pickle anywhere: safetensors stores raw tensors, the metadata is JSON text.
`load_bundle` checks the document and the tensors against the architecture and
refuses with a BundleError that says what is wrong.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.data.transforms import Preprocessing
from chestxray.errors import BundleError

FORMAT = "chestxray-bundle"
FORMAT_VERSION = 1
META_KEY = "chestxray"
BUNDLE_FILENAME = "model.safetensors"


@dataclass
class BundleMeta:
    """The JSON half of a bundle."""

    architecture: str
    labels: list[str]
    preprocessing: Preprocessing
    thresholds: list[float]
    name: str = "chestxray-model"
    threshold_method: str = "per-class F1-optimal on the validation split"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    notes: str = "Research and teaching use only. Not a medical device."
    # Optional (old bundles have none; serialised only when set): the per-finding
    # calibrator, the operating point's policy and validation figures, the input check.
    calibration: dict[str, Any] | None = None
    operating_point: dict[str, Any] | None = None
    input_check: dict[str, Any] | None = None
    orientation: dict[str, Any] | None = None  # template check for turned / inverted radiographs

    def to_json(self) -> str:
        optional = {k: getattr(self, k) for k in OPTIONAL_SECTIONS if getattr(self, k) is not None}
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "name": self.name,
                "architecture": self.architecture,
                "labels": list(self.labels),
                "preprocessing": self.preprocessing.to_dict(),
                "thresholds": {lab: float(t) for lab, t in zip(self.labels, self.thresholds)},
                "threshold_method": self.threshold_method,
                "training": self.training,
                "metrics": self.metrics,
                "versions": self.versions,
                "created": self.created,
                "notes": self.notes,
                **optional,
            },
            default=_json_default,
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> "BundleMeta":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{source}: metadata is not valid JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BundleError(f"{source}: not a chestxray bundle (metadata 'format' is not {FORMAT!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise BundleError(f"{source}: bundle format {d.get('format_version')} is newer than this package reads")
        for key in ("architecture", "labels", "preprocessing", "thresholds"):
            if key not in d:
                raise BundleError(f"{source}: metadata lacks the field {key!r}")
        labels = d["labels"]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise BundleError(f"{source}: 'labels' must be a non-empty list of names")
        thr = d["thresholds"]
        if not isinstance(thr, dict) or set(thr) != set(labels):
            raise BundleError(f"{source}: 'thresholds' must give one value per label ({len(labels)} labels)")
        thresholds = [float(thr[lab]) for lab in labels]
        if not all(0.0 <= t <= 1.0 for t in thresholds):
            raise BundleError(f"{source}: thresholds must lie in [0, 1]")
        try:
            pre = Preprocessing.from_dict(d["preprocessing"])
        except Exception as exc:
            raise BundleError(f"{source}: {exc}") from None
        return cls(
            architecture=str(d["architecture"]),
            labels=labels,
            preprocessing=pre,
            thresholds=thresholds,
            name=str(d.get("name", "chestxray-model")),
            threshold_method=str(d.get("threshold_method", "")),
            training=d.get("training", {}) or {},
            metrics=d.get("metrics", {}) or {},
            versions=d.get("versions", {}) or {},
            created=str(d.get("created", "")),
            notes=str(d.get("notes", "")),
            **{k: _optional_section(d, k, source) for k in OPTIONAL_SECTIONS},
        )


OPTIONAL_SECTIONS = ("calibration", "operating_point", "input_check", "orientation")
# Tensors stored beside the weights (e.g. "input_check.basis"); not part of the network.
EXTRA_TENSOR_PREFIXES = ("input_check.",)


def _optional_section(d: dict[str, Any], key: str, source: str) -> dict[str, Any] | None:
    value = d.get(key)
    if value is not None and not isinstance(value, dict):
        raise BundleError(f"{source}: metadata field {key!r} must be an object")
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def runtime_versions() -> dict[str, str]:
    import torch
    import torchvision

    from chestxray import __version__

    return {
        "chestxray": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def resolve_bundle_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / BUNDLE_FILENAME
    if not p.is_file():
        raise BundleError(
            f"{path}: no model bundle there (expected a .safetensors file or a run folder with {BUNDLE_FILENAME})"
        )
    return p


def read_bundle_meta(path: str | os.PathLike) -> BundleMeta:
    """The metadata of a bundle, without loading its weights."""
    from safetensors import safe_open

    p = resolve_bundle_path(path)
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise BundleError(f"{p}: not a readable safetensors file ({exc})") from None
    if META_KEY not in meta:
        raise BundleError(f"{p}: safetensors file without chestxray metadata; not a model bundle")
    return BundleMeta.from_json(meta[META_KEY], str(p))


def save_bundle(
    model: Any, meta: BundleMeta, path: str | os.PathLike, *, half: bool = False, extra: dict[str, Any] | None = None
) -> Path:
    """Write weights + metadata atomically. `half` stores float tensors as float16.
    `extra`: named arrays stored beside the weights (prefixes in EXTRA_TENSOR_PREFIXES)."""
    import torch
    from safetensors.torch import save_file

    from chestxray.io import atomic_write

    if len(meta.labels) != len(meta.thresholds):
        raise BundleError("save_bundle: one threshold per label is required")
    if not meta.created:
        meta.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if not meta.versions:
        meta.versions = runtime_versions()
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.to(torch.float16)
        state[k] = v.contiguous()
    for k, v in (extra or {}).items():
        if not k.startswith(EXTRA_TENSOR_PREFIXES):
            raise BundleError(f"save_bundle: extra tensor {k!r} needs one of the prefixes {EXTRA_TENSOR_PREFIXES}")
        state[k] = torch.as_tensor(np.ascontiguousarray(v))
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={META_KEY: meta.to_json()}))


def load_bundle(path: str | os.PathLike, device: str = "cpu"):  # -> (ChestClassifier, BundleMeta)
    """Rebuild the model of a bundle, in eval mode, on `device`."""
    import torch
    from safetensors.torch import load_file

    from chestxray.models.build import build_from_meta

    p = resolve_bundle_path(path)
    meta = read_bundle_meta(p)
    try:
        model = build_from_meta(meta.architecture, len(meta.labels), meta.preprocessing, meta.training.get("members"))
    except Exception as exc:
        raise BundleError(f"{p}: cannot build architecture {meta.architecture!r} ({exc})") from None
    state = {k: v for k, v in load_file(str(p)).items() if not k.startswith(EXTRA_TENSOR_PREFIXES)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"{p}: weights do not match {meta.architecture} with {len(meta.labels)} labels: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise BundleError(
            f"{p}: tensor {k} has shape {tuple(state[k].shape)}, the architecture needs "
            f"{tuple(expected[k].shape)} ({len(bad)} mismatched; label count in metadata: {len(meta.labels)})"
        )
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.to(torch.device(device)), meta
