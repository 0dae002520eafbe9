"""chestxray: a multi-label classifier for the 14 NIH ChestX-ray14 findings.

Research and teaching software. It is not a medical device and must not be used
for diagnosis or any clinical decision.
"""

from chestxray.errors import BundleError, ChestXrayError, DatasetError, ImageReadError
from chestxray.labels import FINDINGS, parse_finding_labels

__version__ = "0.1.0"

NOT_FOR_CLINICAL_USE = (
    "Research and teaching use only. Not a medical device; not for clinical use."
)

__all__ = [
    "FINDINGS",
    "NOT_FOR_CLINICAL_USE",
    "BundleError",
    "ChestXrayError",
    "DatasetError",
    "ImageReadError",
    "parse_finding_labels",
    "__version__",
]
