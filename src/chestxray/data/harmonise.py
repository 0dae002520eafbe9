"""Label harmonisation: one vocabulary of findings and, per dataset, the table from its own
label names to it. The tables are data; `chestxray datasets` prints them.

Rules: NIH's 14 spellings where a finding exists there; a dataset name maps to a vocabulary
finding only when it means the same thing (CheXpert "Lung Lesion" stays its own finding,
not Mass or Nodule; PadChest "aortic elongation" is not VinDr "Aortic enlargement").
Several own names may map to one finding (PadChest's rib / clavicle / vertebral
fractures are all Fracture): the finding is positive when any of them is, negative when
all are negative, unknown otherwise. Names mapped to None (e.g. "No Finding") are not findings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chestxray.labels import FINDINGS

# NIH's 14 first, then the other datasets' findings.
VOCABULARY: tuple[str, ...] = (
    *FINDINGS,
    "Lung Opacity",
    "Lung Lesion",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Support Devices",
    "Pleural Other",
    "Aortic enlargement",
    "Calcification",
    "ILD",
    "Nodule or mass",
    "Airspace opacity",
    "Tuberculosis",
)

_CHEXPERT: dict[str, str | None] = {
    "No Finding": None,
    "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
    "Cardiomegaly": "Cardiomegaly",
    "Lung Opacity": "Lung Opacity",
    "Lung Lesion": "Lung Lesion",
    "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Effusion",
    "Pleural Other": "Pleural Other",
    "Fracture": "Fracture",
    "Support Devices": "Support Devices",
}

# PadChest terms (lower case, as in its `Labels` column; Bustos et al. 2020, table of the
# 174 radiological findings). Synonyms follow PadChest's own hierarchy.
_PADCHEST: dict[str, str | None] = {
    "normal": None,
    "exclude": None,
    "suboptimal study": None,
    "atelectasis": "Atelectasis",
    "laminar atelectasis": "Atelectasis",
    "lobar atelectasis": "Atelectasis",
    "segmental atelectasis": "Atelectasis",
    "total atelectasis": "Atelectasis",
    "round atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "pleural effusion": "Effusion",
    "loculated pleural effusion": "Effusion",
    "infiltrates": "Infiltration",
    "interstitial pattern": "Infiltration",
    "reticular interstitial pattern": "Infiltration",
    "reticulonodular interstitial pattern": "Infiltration",
    "ground glass pattern": "Infiltration",
    "mass": "Mass",
    "pulmonary mass": "Mass",
    "mediastinal mass": "Mass",
    "breast mass": None,  # soft tissue, not a lung finding
    "nodule": "Nodule",
    "multiple nodules": "Nodule",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "alveolar pattern": "Consolidation",
    "air bronchogram": "Consolidation",
    "pulmonary edema": "Edema",
    "emphysema": "Emphysema",
    "pulmonary fibrosis": "Fibrosis",
    "pleural thickening": "Pleural_Thickening",
    "apical pleural thickening": "Pleural_Thickening",
    "hiatal hernia": "Hernia",
    "fracture": "Fracture",
    "rib fracture": "Fracture",
    "clavicle fracture": "Fracture",
    "vertebral fracture": "Fracture",
    "humeral fracture": "Fracture",
    "callus rib fracture": "Fracture",
    "pacemaker": "Support Devices",
    "dual chamber device": "Support Devices",
    "single chamber device": "Support Devices",
    "electrical device": "Support Devices",
    "endotracheal tube": "Support Devices",
    "nsg tube": "Support Devices",
    "NSG tube": "Support Devices",
    "central venous catheter": "Support Devices",
    "central venous catheter via jugular vein": "Support Devices",
    "central venous catheter via subclavian vein": "Support Devices",
    "tracheostomy tube": "Support Devices",
    "chest drain tube": "Support Devices",
    "calcified granuloma": "Calcification",
    "calcified adenopathy": "Calcification",
    "tuberculosis": "Tuberculosis",
    "tuberculosis sequelae": "Tuberculosis",
}

_VINDR: dict[str, str | None] = {
    "No finding": None,
    "Aortic enlargement": "Aortic enlargement",
    "Atelectasis": "Atelectasis",
    "Calcification": "Calcification",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "ILD": "ILD",
    "Infiltration": "Infiltration",
    "Lung Opacity": "Lung Opacity",
    "Nodule/Mass": "Nodule or mass",
    "Other lesion": None,  # VinDr's catch-all; no counterpart
    "Pleural effusion": "Effusion",
    "Pleural thickening": "Pleural_Thickening",
    "Pneumothorax": "Pneumothorax",
    "Pulmonary fibrosis": "Fibrosis",
}

_GOOGLE2019: dict[str, str | None] = {
    "Fracture": "Fracture",
    "Pneumothorax": "Pneumothorax",
    "Airspace opacity": "Airspace opacity",
    "Nodule or mass": "Nodule or mass",
}

MAPPINGS: dict[str, dict[str, str | None]] = {
    "nih": {name: name for name in FINDINGS},
    "chexpert": _CHEXPERT,
    "mimic": _CHEXPERT,  # MIMIC-CXR-JPG labels come from the CheXpert labeler
    "padchest": _PADCHEST,
    "vindr": _VINDR,
    "google2019": _GOOGLE2019,
}

# Findings a model can be scored on without predicting them itself: the maximum of the
# probabilities of findings it does predict. Airspace opacity (Majkowska et al. 2020: any
# opacity filling airspaces) is taken as consolidation, pneumonia or infiltration.
DERIVED: dict[str, tuple[str, ...]] = {
    "Nodule or mass": ("Nodule", "Mass"),
    "Airspace opacity": ("Consolidation", "Pneumonia", "Infiltration"),
}

# Any spelling in any table (case-insensitive), for user spreadsheets (the csv reader).
_ANY = {
    **{v.lower(): v for v in VOCABULARY},
    **{k.lower(): v for table in MAPPINGS.values() for k, v in table.items() if v is not None},
    "pleural thickening": "Pleural_Thickening",
    "no finding": None,
}


def mapping_for(dataset: str, names: Sequence[str]) -> dict[str, str | None]:
    """own name -> vocabulary finding (or None) for a dataset's label names. Names a table does
    not list keep their own spelling when it is a vocabulary name, else stay unmapped."""
    table = MAPPINGS.get(dataset, {})
    out: dict[str, str | None] = {}
    for name in names:
        if name in table:
            out[name] = table[name]
        elif dataset == "csv" or name.lower() in _ANY:
            out[name] = _ANY.get(name.strip().lower())
        else:
            out[name] = None
    return out


def harmonise(
    dataset: str, names: Sequence[str], labels: np.ndarray
) -> tuple[list[str], np.ndarray, dict[str, list[str]]]:
    """(vocabulary findings, N x F matrix, finding -> own names) of a dataset's own label matrix,
    combining several own names by "any positive / all negative / else unknown"."""
    mapping = mapping_for(dataset, names)
    sources: dict[str, list[str]] = {}
    for own, target in mapping.items():
        if target is not None:
            sources.setdefault(target, []).append(own)
    findings = [f for f in VOCABULARY if f in sources] + sorted(f for f in sources if f not in VOCABULARY)
    position = {n: i for i, n in enumerate(names)}
    out = np.full((len(labels), len(findings)), np.nan, dtype=np.float32)
    for j, finding in enumerate(findings):
        cols = labels[:, [position[s] for s in sources[finding]]]
        if cols.shape[1] == 1:
            out[:, j] = cols[:, 0]
            continue
        known_all = ~np.isnan(cols).any(axis=1)
        out[known_all, j] = 0.0
        out[(cols == 1).any(axis=1), j] = 1.0
    return findings, out, sources


def targets_for(
    dataset: str, names: Sequence[str], labels: np.ndarray, wanted: Sequence[str]
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """N x len(wanted) targets over vocabulary findings (NaN where the dataset does not label a
    finding) and finding -> own names for the findings it does label."""
    findings, matrix, sources = harmonise(dataset, names, labels)
    out = np.full((len(labels), len(wanted)), np.nan, dtype=np.float32)
    for j, w in enumerate(wanted):
        if w in findings:
            out[:, j] = matrix[:, findings.index(w)]
    return out, {w: sources[w] for w in wanted if w in sources}


def mapping_rows(dataset: str) -> list[tuple[str, str]]:
    """(own name, vocabulary finding or '-') rows of a dataset's table, for printing."""
    return [(own, target or "-") for own, target in MAPPINGS.get(dataset, {}).items()]
