"""DICOM results of one analysed instance: a TID 1500 Comprehensive SR and, with Grad-CAM,
one RGB Secondary Capture per positive finding. Built with highdicom."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from chestxray.pacs import codes as cx
from chestxray.pacs.engine import Cam, ModelInfo

if TYPE_CHECKING:
    from chestxray.inference.predict import Prediction

SR_SERIES_DESCRIPTION = "chestxray findings"
SC_SERIES_DESCRIPTION = "chestxray Grad-CAM overlays"
RESEARCH_ONLY = "Research use only. Not for clinical use."
MANUFACTURER = "chestxray (open source)"
NOT_FOR_CLINICAL_USE_CAPS = "NOT FOR CLINICAL USE"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


def result_uid(source_uid: str, model_sha256: str, what: str) -> str:
    """UIDs derived from the source instance and the model: a re-run after a crash makes
    the same objects, so a receiver stores them once."""
    return str(generate_uid(entropy_srcs=[source_uid, model_sha256, what]))


def _algorithm(info: ModelInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=f"chestxray {info.name}", version=info.version, parameters=[f"{info.variant}; sha256 {info.sha256}"]
    )


def _text(name: object, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name,  # type: ignore[arg-type]
        value=value[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def build_sr(source: Dataset, prediction: "Prediction", info: ModelInfo) -> Dataset:
    """The measurement report of `prediction` (findings of `source`) as a Comprehensive SR."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=str(generate_uid(entropy_srcs=["chestxray device", info.sha256])),
        name="chestxray",
        manufacturer_name=MANUFACTURER,
        model_name=f"{info.name} ({info.variant}) chestxray {info.version}"[:64],
        serial_number=info.sha256[:64],  # the model file's SHA-256 (64 hex digits)
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    source_ref = hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
    policy = info.policy or prediction.threshold_policy or "per-finding thresholds of the model"
    groups = []
    for i, f in enumerate(prediction.findings):
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=result_uid(source.SOPInstanceUID, info.sha256, f"group {f.finding}"),
                identifier=f"{f.finding} #{i + 1}",
            ),
            finding_type=cx.finding_code(f.finding),
            algorithm_id=_algorithm(info),
            source_images=[source_ref],
            measurements=[
                hd.sr.Measurement(name=cx.PROBABILITY, value=round(f.probability, 6), unit=cx.UNITLESS),
                hd.sr.Measurement(name=cx.THRESHOLD, value=round(f.threshold, 6), unit=cx.UNITLESS),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(cx.PRESENCE, cx.PRESENT if f.positive else cx.ABSENT),
            ],
        )
        # The threshold's policy: a TEXT item in the group (highdicom's template has no slot for it).
        group[0].ContentSequence.append(_text(cx.THRESHOLD_POLICY, policy))
        groups.append(group)
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=cx.IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    root = report[0]
    for warning in prediction.warnings:
        root.ContentSequence.append(_text(cx.WARNING, warning))
    root.ContentSequence.append(_text(cx.DISCLAIMER, RESEARCH_ONLY))
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report,
        series_instance_uid=result_uid(source.StudyInstanceUID, info.sha256, "sr series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(source.SOPInstanceUID, info.sha256, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = [cx.coding_scheme_identification()]
    sr.SoftwareVersions = info.version
    return sr


def caption(cam: Cam) -> str:
    return f"{cam.finding}  p={cam.probability:.2f} (threshold {cam.threshold:.2f})  |  {NOT_FOR_CLINICAL_USE_CAPS}"


def build_sc(source: Dataset, cam: Cam, info: ModelInfo, number: int) -> Dataset:
    """A Secondary Capture of the Grad-CAM overlay of `cam` with its caption burned in."""
    from chestxray.inference.explain import draw_caption

    pixels = draw_caption(np.ascontiguousarray(cam.rgb, dtype=np.uint8), caption(cam))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid(source.StudyInstanceUID, info.sha256, "sc series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(source.SOPInstanceUID, info.sha256, f"sc {cam.finding}"),
        instance_number=number,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.BurnedInAnnotation = "YES"
    # General Series: Laterality is type 2C; a chest is unpaired, so empty unless the source says.
    sc.Laterality = str(source.get("Laterality", "") or "")
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageComments = f"Grad-CAM {cam.finding} p={cam.probability:.4f}; {info.name}; {RESEARCH_ONLY}"[:10240]
    sc.DerivationDescription = f"Grad-CAM overlay of {cam.finding} by chestxray {info.version} ({info.name})"[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.SoftwareVersions = info.version
    return sc


def build_results(
    source: Dataset, prediction: "Prediction", info: ModelInfo, cams: Sequence[Cam] = ()
) -> list[Dataset]:
    """The SR, then one SC per overlay."""
    return [build_sr(source, prediction, info), *(build_sc(source, c, info, i + 1) for i, c in enumerate(cams))]
