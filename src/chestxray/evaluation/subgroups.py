"""Subgroup evaluation: per-finding AUROC with patient-bootstrap CIs within each subgroup
(sex, age band, view), the gap to the whole split, and a flag where a subgroup's interval
lies wholly below the whole split's estimate."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from chestxray.evaluation.metrics import _auroc, _nan_to_none, bootstrap_ci

SUBGROUP_COLUMNS = ("sex", "age", "view")
AGE_BANDS = ("<40", "40-59", ">=60")


def parse_by(text: str | None, available: Sequence[str]) -> list[str]:
    """`--by sex,age,view` -> the columns; default (None): every one the metadata has."""
    if text is None:
        return [c for c in SUBGROUP_COLUMNS if c in available]
    cols = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [c for c in cols if c not in SUBGROUP_COLUMNS and c != "none"]
    if bad:
        raise ValueError(f"by={text!r}: unknown subgroup {bad[0]!r}; choose from {', '.join(SUBGROUP_COLUMNS)}")
    return [c for c in cols if c != "none"]


def age_band(value: Any) -> str | None:
    """NIH ages are "58" or, in the first release, "058Y"; months/days mean a child (< 40)."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        value = str(int(value)) if np.isfinite(value) and value >= 0 else ""  # the readers' float years
    m = re.fullmatch(r"\s*(\d+)\s*([YMWD]?)\s*", str(value), flags=re.I)
    if not m:
        return None
    years = int(m.group(1)) if m.group(2).upper() in ("", "Y") else 0
    if years > 120:  # a few NIH rows carry impossible ages (e.g. 414)
        return None
    return "<40" if years < 40 else ("40-59" if years < 60 else ">=60")


UNKNOWN_VALUES = ("", "NONE", "NAN", "UNKNOWN")  # what a reader writes where a value is not recorded


def subgroup_labels(frame: Any, column: str) -> np.ndarray:
    """Each row's subgroup ("" where the value is not recorded)."""
    values = frame[column].tolist()
    if column == "age":
        return np.array([age_band(v) or "" for v in values], dtype=object)
    out = ["" if v is None or v != v else str(v).strip().upper() for v in values]
    return np.array(["" if v in UNKNOWN_VALUES else v for v in out], dtype=object)


def missing_reason(frame: Any, column: str) -> str | None:
    """Why `column` gives no subgroups (absent, or no row records it), or None when it does."""
    if column not in frame.columns:
        return f"the labels file has no {column} column"
    if not any(subgroup_labels(frame, column)):
        return f"no image records its {column}"
    return None


def evaluate_subgroups(
    targets: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray,
    frame: Any,
    labels: Sequence[str],
    by: Sequence[str],
    overall: dict[str, Any],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """{column: {group: {n_images, n_patients, per_class: {finding: auroc, ci, gap, below}}}}."""
    out: dict[str, Any] = {"age_bands": list(AGE_BANDS), "columns": {}}
    for column in by:
        reason = missing_reason(frame, column)
        if reason is not None:
            out["columns"][column] = {"missing": reason}
            continue
        values = subgroup_labels(frame, column)
        groups: dict[str, Any] = {}
        order = list(AGE_BANDS) if column == "age" else sorted({v for v in values if v})
        for g in order:
            mask = values == g
            if not mask.any():
                continue
            t, p, pat = targets[mask], probs[mask], patients[mask]
            ci = bootstrap_ci(t, p, pat, n_boot=n_boot, seed=seed) if n_boot > 0 else None
            per: dict[str, Any] = {}
            for c, name in enumerate(labels):
                known = ~np.isnan(np.asarray(t[:, c], dtype=np.float64))  # blank = unknown: left out
                y = t[known, c]
                auc = _nan_to_none(_auroc(y, p[known, c]))
                whole = overall["per_class"][name]["auroc"]
                lo_hi = [_nan_to_none(v) for v in ci["auroc"][:, c]] if ci is not None else [None, None]
                if auc is None:
                    lo_hi = [None, None]
                per[name] = {
                    "support": int(y.sum()),
                    "labelled": int(known.sum()),
                    "prevalence": float(y.mean()) if len(y) else None,
                    "auroc": auc,
                    "auroc_ci": lo_hi,
                    "gap": None if auc is None or whole is None else auc - whole,
                    "below": bool(lo_hi[1] is not None and whole is not None and lo_hi[1] < whole),
                }
            defined = [e["auroc"] for e in per.values() if e["auroc"] is not None]
            groups[g] = {
                "n_images": int(mask.sum()),
                "n_patients": int(len(np.unique(pat))),
                "macro_auroc": float(np.mean(defined)) if defined else None,
                "per_class": per,
            }
        out["columns"][column] = groups
    return out


def subgroups_markdown(sub: dict[str, Any], labels: Sequence[str]) -> str:
    """The subgroup tables; columns that give no subgroups get one line together, no table."""
    missing = {c: g["missing"] for c, g in sub["columns"].items() if "missing" in g}
    note = "Not evaluated by " + "; by ".join(f"{c} ({why})" for c, why in missing.items()) + "." if missing else ""
    if len(missing) == len(sub["columns"]):
        return "\n".join(["## Subgroups", "", note, ""])
    lines = [
        "## Subgroups",
        "",
        *([note, ""] if note else []),
        "Per-finding AUROC within each subgroup (95% patient-bootstrap CI) and its gap to the whole split. "
        "**Bold with !**: the subgroup's interval lies wholly below the whole split's estimate. "
        f"Age bands: {', '.join(AGE_BANDS)} years. Empty cells: AUROC undefined (no positive or no negative).",
        "",
    ]
    for column, groups in sub["columns"].items():
        if "missing" in groups:
            continue
        names = list(groups)
        lines += [
            f"### By {column}",
            "",
            "| finding | " + " | ".join(f"{g} (n={groups[g]['n_images']})" for g in names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for lab in labels:
            cells = []
            for g in names:
                e = groups[g]["per_class"][lab]
                if e["auroc"] is None:
                    cells.append("")
                    continue
                ci = f" ({e['auroc_ci'][0]:.2f}-{e['auroc_ci'][1]:.2f})" if e["auroc_ci"][0] is not None else ""
                cell = f"{e['auroc']:.3f}{ci}, {e['gap']:+.3f}"
                cells.append(f"**{cell} !**" if e["below"] else cell)
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        macro = [groups[g]["macro_auroc"] for g in names]
        lines.append("| *macro* | " + " | ".join("" if m is None else f"{m:.3f}" for m in macro) + " |")
        lines.append("")
    return "\n".join(lines)
