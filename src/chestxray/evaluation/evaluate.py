"""Evaluate a bundle on a split: probabilities, metrics with patient bootstrap CIs, curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.evaluation.metrics import evaluate_predictions
from chestxray.io import atomic_write, atomic_write_text


def split_probabilities(
    analyzer: Any, index: Any, split: str, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(probabilities, targets, patient ids, image names) of one split, read from the images
    through the analyzer's own preprocessing (exactly what `predict` does)."""
    from chestxray.errors import ChestXrayError

    pos = index.split_positions(split)
    if len(pos) == 0:
        raise ChestXrayError(f"the {split} split of {index.root} has no images")
    paths = index.frame["path"].iloc[pos].tolist()
    names = index.frame["image"].iloc[pos].tolist()
    preds = analyzer.predict(paths, names=names, progress=progress)
    bad = [p for p in preds if not p.ok]
    if bad:
        raise ChestXrayError(
            f"{len(bad)} images of the {split} split could not be read, e.g. {bad[0].file}: {bad[0].error}"
        )
    probs = np.array([[p.probability(lab) for lab in analyzer.labels] for p in preds])
    # Targets in the model's label order (a bundle may order or subset its labels).
    unknown = [lab for lab in analyzer.labels if lab not in index.pathologies]
    if unknown:
        raise ChestXrayError(f"model {analyzer.name} predicts {unknown}, which {index.root} does not label")
    cols = [list(index.pathologies).index(lab) for lab in analyzer.labels]
    targets = index.labels[pos][:, cols]
    return probs, targets, index.frame["patient_id"].iloc[pos].to_numpy(), names


def write_curves(targets: np.ndarray, probs: np.ndarray, labels: list[str], out: Path, title: str) -> list[Path]:
    """ROC and precision-recall curves, one panel per finding (classes without positives skipped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_curve

    written = []
    for kind in ("roc", "pr"):
        fig = Figure(figsize=(16, 9), dpi=80)
        FigureCanvasAgg(fig)
        axes = fig.subplots(3, 5).ravel()
        for c, name in enumerate(labels):
            ax = axes[c]
            y = targets[:, c] > 0.5
            ax.set_title(name, fontsize=9)
            if not y.any() or y.all():
                ax.text(0.5, 0.5, "undefined\n(no positives)" if not y.any() else "undefined", ha="center", va="center")
                continue
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y, probs[:, c])
                ax.plot(fpr, tpr)
                ax.plot([0, 1], [0, 1], ls=":", c="grey")
                ax.set_xlabel("1 - specificity", fontsize=7)
                ax.set_ylabel("sensitivity", fontsize=7)
            else:
                prec, rec, _ = precision_recall_curve(y, probs[:, c])
                ax.plot(rec, prec)
                ax.axhline(y.mean(), ls=":", c="grey")
                ax.set_xlabel("recall", fontsize=7)
                ax.set_ylabel("precision", fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
        axes[-1].axis("off")
        fig.suptitle(f"{'ROC' if kind == 'roc' else 'Precision-recall'} curves - {title}")
        fig.tight_layout()
        path = out / f"{kind}_curves.png"
        atomic_write(path, lambda p, fig=fig: fig.savefig(p, format="png"))
        written.append(path)
    return written


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "undefined" if v is None else format(v, spec)


def _ci(v: list | None) -> str:
    return "" if not v or v[0] is None else f" ({v[0]:.3f}-{v[1]:.3f})"


def report_markdown(result: dict[str, Any], model_name: str, split: str, root: str) -> str:
    m = result["macro"]
    lines = [
        f"# Evaluation of `{model_name}` on the {split} split of `{root}`",
        "",
        f"> {NOT_FOR_CLINICAL_USE}",
        "",
        f"{result['n_images']} images, {result['n_patients']} patients. Confidence intervals: 95% bootstrap, "
        f"{result.get('bootstrap', {}).get('replicates', 0)} replicates resampling patients.",
        "",
        f"- **Macro AUROC**: {_fmt(m['auroc'])}{_ci(m.get('auroc_ci'))} over {result['defined_auroc_classes']} "
        "findings with positives",
        f"- Macro AUPRC: {_fmt(m['auprc'])}{_ci(m.get('auprc_ci'))}; macro F1 at the tuned thresholds: {_fmt(m['f1'])}",
        f'- Element-wise accuracy: {result["elementwise_accuracy"]:.4f}, while predicting "all negative" scores '
        f"{result['all_negative_accuracy']:.4f} on the same data. Accuracy over 14 rare findings says little; "
        "read AUROC and AUPRC.",
        "",
        "| finding | support | prevalence | AUROC (95% CI) | AUPRC (95% CI) | threshold | F1 | precision | recall | specificity |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, e in result["per_class"].items():
        lines.append(
            f"| {name} | {e['support']} | {_fmt(e['prevalence'])} | {_fmt(e['auroc'])}{_ci(e.get('auroc_ci'))} | "
            f"{_fmt(e['auprc'])}{_ci(e.get('auprc_ci'))} | {e['threshold']:.3f} | {_fmt(e['f1'])} | "
            f"{_fmt(e['precision'])} | {_fmt(e['recall'])} | {_fmt(e['specificity'])} |"
        )
    lines += ["", "Curves: `roc_curves.png`, `pr_curves.png`.", ""]
    if "calibration" in result:
        lines += calibration_markdown(result)
    return "\n".join(lines)


def calibration_markdown(result: dict[str, Any]) -> list[str]:
    cal = result["calibration"]
    m = cal["macro"]
    lines = [
        "## Calibration",
        "",
        f"Probabilities {'after the bundle calibrator (' + cal['calibrator'] + ')' if cal['calibrator'] else 'as the model gives them (no calibrator in the bundle)'}. "
        f"Macro Brier score {m['brier']:.4f}, macro expected calibration error (ECE) {m['ece']:.4f}; "
        f"ECE binning: {cal['binning']}. Reliability diagram: `reliability.png`.",
    ]
    op = result.get("operating_point")
    if op:
        lines += ["", f"Thresholds: policy `{op['policy']}`, tuned on {op.get('tuned_on') or 'validation'}."]
    lines += ["", "| finding | Brier | ECE |", "|---|---:|---:|"]
    for name, e in cal["per_class"].items():
        lines.append(f"| {name} | {e['brier']:.4f} | {e['ece']:.4f} |")
    return [*lines, ""]


def run_evaluation(
    analyzer: Any,
    index: Any,
    split: str,
    out: Path,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
    by: list[str] | None = None,
) -> dict[str, Any]:
    """`by`: subgroup columns (sex, age, view); None = every one the labels file has."""
    from chestxray.evaluation.calibration import calibration_metrics, write_reliability
    from chestxray.evaluation.subgroups import evaluate_subgroups, subgroups_markdown

    probs, targets, groups, _ = split_probabilities(analyzer, index, split, progress=progress)
    result = evaluate_predictions(
        targets, probs, analyzer.thresholds, analyzer.labels, groups=groups, n_boot=n_boot, seed=seed
    )
    result = {
        "model": analyzer.name,
        "split": split,
        "dataset_root": str(index.root),
        "note": NOT_FOR_CLINICAL_USE,
        **result,
    }
    meta = analyzer.meta
    calibrator = (getattr(meta, "calibration", None) or {}).get("method")
    result["calibration"] = {"calibrator": calibrator, **calibration_metrics(targets, probs, analyzer.labels)}
    if getattr(meta, "operating_point", None):
        result["operating_point"] = {k: meta.operating_point.get(k) for k in ("policy", "tuned_on")}
    frame = index.frame.iloc[index.split_positions(split)]
    columns = [c for c in ("sex", "age", "view") if c in frame.columns] if by is None else by
    if columns:
        result["subgroups"] = evaluate_subgroups(
            targets, probs, groups, frame, analyzer.labels, columns, result, n_boot=n_boot, seed=seed
        )
    out.mkdir(parents=True, exist_ok=True)
    title = f"{analyzer.name}, {split} split"
    write_curves(targets, probs, analyzer.labels, out, title)
    write_reliability(targets, probs, analyzer.labels, out, title)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    md = report_markdown(result, analyzer.name, split, str(index.root))
    if "subgroups" in result:
        md += "\n" + subgroups_markdown(result["subgroups"], analyzer.labels)
    atomic_write_text(out / "report.md", md)
    return result
