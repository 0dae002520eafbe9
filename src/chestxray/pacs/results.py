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


# Patient, Clinical Trial Subject, General Study and Patient Study modules (PS3.3 C.7.1.1,
# C.7.1.3, C.7.2.1, C.7.2.2): what an SR copies from its source.
PATIENT_STUDY = [
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "PatientSex",
    "QualityControlSubject",
    "StrainDescription",
    "StrainNomenclature",
    "StrainStockSequence",
    "StrainAdditionalInformation",
    "StrainCodeSequence",
    "GeneticModificationsSequence",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence",
    "EthnicGroup",
    "EthnicGroupCodeSequence",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence",
    "ReferencedPatientSequence",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingServiceCodeSequence",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientSizeCodeSequence",
    "MedicalAlerts",
    "Allergies",
    "SmokingStatus",
    "PregnancyStatus",
    "LastMenstrualDate",
    "PatientState",
    "Occupation",
    "AdditionalPatientHistory",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence",
    "PatientSexNeutered",
]


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

    def build(self, source: Dataset, prediction: "Prediction") -> Dataset:
        import copy
        import io

        import pydicom

        if self._template is None or len(prediction.findings) != len(self.info.labels):
            sr = build_sr(source, prediction, self.info)
            if self._template is None and len(prediction.findings) == len(self.info.labels):
                buf = io.BytesIO()
                sr.save_as(buf, enforce_file_format=True)
                self._template = pydicom.dcmread(io.BytesIO(buf.getvalue()))
            return sr
        sr = self._template
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
        warnings = [_text(cx.WARNING, w) for w in prediction.warnings]
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
) -> list[Dataset]:
    """The SR, then one SC per overlay."""
    sr = factory.build(source, prediction)
    return [sr, *(build_sc(source, c, factory.info, i + 1) for i, c in enumerate(cams))]
