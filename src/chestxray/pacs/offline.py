"""`chestxray predict FILE.dcm --dicom-out DIR`: the SR (and, with --cam, one Secondary
Capture per positive finding) of each DICOM input, written beside the usual outputs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from chestxray.errors import ChestXrayError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from chestxray.inference.predict import Analyzer, Prediction

log = logging.getLogger("chestxray.pacs")
FORMATS = ("table", "json")  # the formats whose predictions are gathered before they are written


def check_dicom_out(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ChestXrayError(f"--dicom-out works with --format {' or '.join(FORMATS)}, not {fmt}")
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise ChestXrayError("--dicom-out needs highdicom: pip install 'chestxray[pacs]'") from None


def _save(ds: "Dataset", path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def write_dicom_results(
    predictions: Sequence["Prediction"], out: Path, analyzer: "Analyzer", model: str | None, backend: str
) -> int:
    import numpy as np
    import pydicom
    from PIL import Image

    from chestxray.io import atomic_write
    from chestxray.pacs.engine import Cam, model_info
    from chestxray.pacs.results import SrFactory, build_sc
    from chestxray.pacs.spool import short_hash

    info = model_info(analyzer, model, backend)
    reports = SrFactory(info)
    out.mkdir(parents=True, exist_ok=True)
    written = not_dicom = 0
    for p in predictions:
        if not p.ok:
            continue
        try:
            source = pydicom.dcmread(p.file, stop_before_pixels=True)
            uid = str(source.SOPInstanceUID)
            _ = source.StudyInstanceUID, source.SOPClassUID
        except Exception:  # not a DICOM file (PNG, JPEG), or one without the UIDs an SR must cite
            not_dicom += 1
            continue
        stem = f"{Path(p.file).stem}_{short_hash(uid)}"
        objects = [(f"{stem}_SR.dcm", reports.build(source, p))]
        positive = {f.finding: f for f in p.positives}
        for i, overlay in enumerate(o for o in p.overlays or [] if o["finding"] in positive):
            f = positive[overlay["finding"]]
            rgb = np.asarray(Image.open(overlay["path"]).convert("RGB"))
            sc = build_sc(source, Cam(f.finding, f.probability, f.threshold, rgb), info, i + 1)
            objects.append((f"{stem}_SC_{f.finding}.dcm", sc))
        for name, ds in objects:
            atomic_write(out / name, partial(_save, ds))
            written += 1
    print(f"wrote {written} DICOM result object(s) to {out}", file=sys.stderr)
    if not_dicom:
        print(f"  {not_dicom} input(s) are not DICOM instances: no SR for them", file=sys.stderr)
    return written
