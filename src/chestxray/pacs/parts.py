"""Parts shared by the report builder (results.py) and its byte template (encode.py)."""

from __future__ import annotations

import highdicom as hd
from pydicom.uid import generate_uid

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


def result_uid(source_uid: str, model_sha256: str, what: str) -> str:
    """UIDs derived from the source instance and the model: a re-run after a crash makes
    the same objects, so a receiver stores them once."""
    return str(generate_uid(entropy_srcs=[source_uid, model_sha256, what]))


def text_item(name: object, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name,  # type: ignore[arg-type]
        value=value[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
