"""Codes used in the structured report: SNOMED CT where the finding has a code, else the
project's private coding scheme, declared in CodingSchemeIdentificationSequence."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99CHESTXRAY"
PRIVATE_SCHEME_NAME = "chestxray findings and algorithm outputs"

# SNOMED CT concepts for the NIH ChestX-ray14 labels. Cardiomegaly, pleural effusion, mass,
# nodule, pneumothorax, pulmonary edema and fibrosis are as listed in DICOM PS3.16; atelectasis,
# pneumonia and (pulmonary) emphysema are SNOMED CT's disorder concepts. Infiltration,
# consolidation, pleural thickening and hernia (NIH's label mixes several kinds) use the
# private scheme: no code of exactly that meaning was checked here.
SNOMED_FINDINGS = {
    "Atelectasis": "46621007",
    "Cardiomegaly": "287272002",
    "Effusion": "60046008",
    "Mass": "4147007",
    "Nodule": "27925004",
    "Pneumonia": "233604007",
    "Pneumothorax": "36118008",
    "Edema": "19242006",
    "Emphysema": "87433001",
    "Fibrosis": "112674009",
}


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


def finding_code(name: str) -> Code:
    """The concept of a finding; its meaning is the finding's name as `chestxray predict` prints it."""
    if name in SNOMED_FINDINGS:
        return Code(SNOMED_FINDINGS[name], "SCT", name)
    return _private(("F-" + name.upper())[:16], name)


# Concepts without a standard code of the exact meaning.
PROBABILITY = _private("PROBABILITY", "Probability of finding")
THRESHOLD = _private("THRESHOLD", "Decision threshold")
THRESHOLD_POLICY = _private("THRESH-POLICY", "Threshold policy")
WARNING = _private("WARNING", "Input warning")
DISCLAIMER = _private("DISCLAIMER", "Disclaimer")
MODEL_SHA256 = _private("MODEL-SHA256", "Model file SHA-256")
# Standard ones.
PRESENCE = Code("121052", "DCM", "Presence of property")  # DCM, PS3.16
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
UNITLESS = Code("1", "UCUM", "no units")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")  # the procedure reported
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")


def coding_scheme_identification() -> Dataset:
    """The item that declares the private scheme (CodingSchemeIdentificationSequence)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "chestxray project"
    return item
