"""DICOM results of one analysed instance: a TID 1500 Comprehensive SR and, with Grad-CAM,
one RGB Secondary Capture per positive finding. Built with highdicom."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DS

from chestxray.pacs import codes as cx
from chestxray.pacs.engine import Cam, ModelInfo
from chestxray.pacs.parts import PATIENT_STUDY, result_uid, text_item

if TYPE_CHECKING:
    from chestxray.inference.predict import Prediction
    from chestxray.pacs.encode import SrEncoder

SR_SERIES_DESCRIPTION = "chestxray findings"
SC_SERIES_DESCRIPTION = "chestxray Grad-CAM overlays"
RESEARCH_ONLY = "Research use only. Not for clinical use."
MANUFACTURER = "chestxray (open source)"
NOT_FOR_CLINICAL_USE_CAPS = "NOT FOR CLINICAL USE"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


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
    order = {name: i for i, name in enumerate(info.labels)}
    findings = sorted(prediction.findings, key=lambda f: order.get(f.finding, len(order)))
    for i, f in enumerate(findings):
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=result_uid(source.SOPInstanceUID, info.sha256, f"group {f.finding}"),
                identifier=f"{f.finding} #{i + 1}",
            ),
            finding_type=cx.finding_code(f.finding),
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
        group[0].ContentSequence.append(text_item(cx.THRESHOLD_POLICY, policy))
        groups.append(group)
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=cx.IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    root = report[0]
    for warning in prediction.warnings:
        root.ContentSequence.append(text_item(cx.WARNING, warning))
    root.ContentSequence.append(text_item(cx.DISCLAIMER, RESEARCH_ONLY))
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


class SrFactory:
    """Structured reports of one model. highdicom builds the first (about a second of CPU, mostly
    its content-tree checks, as much as analysing a batch); every later report is that one,
    read back once and kept, with the per-image parts set: patient and study, UIDs, evidence,
    source references, probabilities, present/absent and warnings. The tree, codes and
    thresholds are the model's and do not change, so the copies are what highdicom would build
    (tested). A report returned by `build` is valid until the next call: write it first."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self._template: Dataset | None = None
        self._encoder: SrEncoder | None = None

    def warm(self) -> None:
        """Build the template now (at start-up) from a stand-in source, not on the first image."""
        from chestxray.inference.predict import Finding, Prediction

        if self._template is not None or not self.info.thresholds:
            return
        stand_in = Dataset()
        stand_in.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        stand_in.SOPInstanceUID, stand_in.StudyInstanceUID = generate_uid(), generate_uid()
        stand_in.SeriesInstanceUID = generate_uid()
        stand_in.PatientName, stand_in.PatientID, stand_in.PatientBirthDate, stand_in.PatientSex = "", "", "", ""
        stand_in.StudyDate, stand_in.StudyTime, stand_in.AccessionNumber, stand_in.StudyID = "", "", "", ""
        stand_in.ReferringPhysicianName = ""
        findings = [Finding(n, 0.0, t, False) for n, t in zip(self.info.labels, self.info.thresholds)]
        self.build(stand_in, Prediction("", self.info.name, findings))

    def _usable(self, source: Dataset, prediction: "Prediction") -> bool:
        return (
            self._template is not None
            and len(prediction.findings) == len(self.info.labels)
            and source.get("SpecificCharacterSet") == self._template.get("SpecificCharacterSet")
        )

    def build(self, source: Dataset, prediction: "Prediction") -> Dataset:
        import io

        import pydicom

        if not self._usable(source, prediction):
            sr = build_sr(source, prediction, self.info)
            if self._template is None and len(prediction.findings) == len(self.info.labels):
                buf = io.BytesIO()
                sr.save_as(buf, enforce_file_format=True)
                self._template = pydicom.dcmread(io.BytesIO(buf.getvalue()))
            return sr
        assert self._template is not None  # for mypy: _usable checked it
        return self.patch(self._template, source, prediction)

    def encode(self, source: Dataset, prediction: "Prediction") -> bytes:
        """The report as a Part 10 file: from the byte template (encode.py) when it applies,
        else built and written by highdicom and pydicom."""
        import io

        from chestxray.pacs.encode import SrEncoder

        if self._encoder is None and self._template is not None:
            self._encoder = SrEncoder(self.info, self._marked(self._template))
        if self._encoder is not None and self._usable(source, prediction):
            data = self._encoder.encode(source, prediction)
            if data is not None:
                return data
        buf = io.BytesIO()
        self.build(source, prediction).save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    def _marked(self, template: Dataset) -> Dataset:
        """The template with the markers of encode.py in every per-image element."""
        from chestxray.inference.predict import Finding, Prediction
        from chestxray.pacs import encode as enc

        source = Dataset()
        source.StudyInstanceUID, source.SeriesInstanceUID = enc.MARK_STUDY, enc.MARK_SERIES
        source.SOPInstanceUID, source.SOPClassUID = enc.MARK_SOP, enc.MARK_CLASS
        pairs = zip(self.info.labels, self.info.thresholds)
        findings = [Finding(n, enc.mark(i), t, True) for i, (n, t) in enumerate(pairs)]
        sr = self.patch(template, source, Prediction("", "", findings))
        for i, group in enumerate(enc.groups(sr)):
            for item in group.ContentSequence:
                if item.ConceptNameCodeSequence[0].CodeMeaning == cx.PRESENCE.meaning:
                    code = item.ConceptCodeSequence[0]
                    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = enc.presence_marks(i)
        return sr

    def patch(self, sr: Dataset, source: Dataset, prediction: "Prediction") -> Dataset:
        """`sr` (the template, changed in place) with the per-image parts of this source."""
        import copy

        for keyword in PATIENT_STUDY:
            if keyword in sr:
                delattr(sr, keyword)
            if keyword in source:
                sr[keyword] = copy.deepcopy(source[keyword])
        sr.StudyInstanceUID = source.StudyInstanceUID
        sr.SeriesInstanceUID = result_uid(source.StudyInstanceUID, self.info.sha256, "sr series")
        sr.SOPInstanceUID = result_uid(source.SOPInstanceUID, self.info.sha256, "sr")
        sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
        now = datetime.datetime.now()
        sr.ContentDate, sr.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
        if "InstanceCreationDate" in sr:  # set by highdicom from 0.24 on
            sr.InstanceCreationDate, sr.InstanceCreationTime = sr.ContentDate, sr.ContentTime
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        evidence.StudyInstanceUID = source.StudyInstanceUID
        series = evidence.ReferencedSeriesSequence[0]
        series.SeriesInstanceUID = source.SeriesInstanceUID
        series.ReferencedSOPSequence[0].ReferencedSOPClassUID = source.SOPClassUID
        series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = source.SOPInstanceUID
        by_name = {f.finding: f for f in prediction.findings}
        measurements = next(c for c in sr.ContentSequence if c.ValueType == "CONTAINER")
        for name, group in zip(self.info.labels, measurements.ContentSequence):
            f = by_name[name]
            for item in group.ContentSequence:
                meaning = item.ConceptNameCodeSequence[0].CodeMeaning
                if item.ValueType == "UIDREF":
                    item.UID = result_uid(source.SOPInstanceUID, self.info.sha256, f"group {name}")
                elif item.ValueType == "IMAGE":
                    item.ReferencedSOPSequence[0].ReferencedSOPClassUID = source.SOPClassUID
                    item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = source.SOPInstanceUID
                elif meaning == cx.PROBABILITY.meaning:
                    value = item.MeasuredValueSequence[0]
                    value.NumericValue = DS(round(f.probability, 6), auto_format=True)  # as highdicom's NUM
                    value.FloatingPointValue = round(f.probability, 6)
                elif meaning == cx.PRESENCE.meaning:
                    code = cx.PRESENT if f.positive else cx.ABSENT
                    concept = item.ConceptCodeSequence[0]
                    concept.CodeValue, concept.CodingSchemeDesignator = code.value, code.scheme_designator
                    concept.CodeMeaning = code.meaning
        kept = [c for c in sr.ContentSequence if not _is_warning(c)]
        warnings = [text_item(cx.WARNING, w) for w in prediction.warnings]
        sr.ContentSequence = kept[:-1] + warnings + kept[-1:]  # the disclaimer stays last
        return sr


def _is_warning(item: Dataset) -> bool:
    return item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == cx.WARNING.value


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
    source: Dataset, prediction: "Prediction", factory: SrFactory, cams: Sequence[Cam] = ()
) -> list[bytes]:
    """The SR, then one SC per overlay, each as the bytes of a Part 10 file."""
    import io

    out = [factory.encode(source, prediction)]
    for i, cam in enumerate(cams):
        buf = io.BytesIO()
        build_sc(source, cam, factory.info, i + 1).save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out
