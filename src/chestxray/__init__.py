"""chestxray: a multi-label classifier for the 14 NIH ChestX-ray14 findings.

Research and teaching software. It is not a medical device and must not be used
for diagnosis or any clinical decision.
"""

from chestxray.errors import BundleError, ChestXrayError, DatasetError, ImageReadError
from chestxray.labels import FINDINGS, parse_finding_labels

__version__ = "0.1.0"

NOT_FOR_CLINICAL_USE = "Research and teaching use only. Not a medical device; not for clinical use."

# The public API, imported on first use (PEP 562) so `import chestxray` stays light and
# works without torch: `from chestxray import Analyzer, explain, load_bundle`.
_LAZY = {
    "Analyzer": "chestxray.inference.predict",
    "Prediction": "chestxray.inference.predict",
    "Finding": "chestxray.inference.predict",
    "explain": "chestxray.inference.explain",
    "gradcam": "chestxray.inference.explain",
    "load_bundle": "chestxray.models.bundle",
    "save_bundle": "chestxray.models.bundle",
    "read_bundle_meta": "chestxray.models.bundle",
    "BundleMeta": "chestxray.models.bundle",
    "create_model": "chestxray.models.registry",
    "register_model": "chestxray.models.registry",
    "read_image": "chestxray.data.images",
    "to_gray": "chestxray.data.images",
    "load_nih": "chestxray.data.index",
    "evaluate_predictions": "chestxray.evaluation.metrics",
    "tune_thresholds": "chestxray.evaluation.thresholds",
    "export_bundle": "chestxray.export.onnx",
    "train": "chestxray.training.loop",
    "TrainConfig": "chestxray.training.config",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'chestxray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    *_LAZY,
    "FINDINGS",
    "NOT_FOR_CLINICAL_USE",
    "BundleError",
    "ChestXrayError",
    "DatasetError",
    "ImageReadError",
    "parse_finding_labels",
    "__version__",
]
