"""Evaluate a bundle on a split: probabilities, metrics with patient bootstrap CIs, curves."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.evaluation.metrics import evaluate_predictions
from chestxray.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)


def _predict_split(analyzer: Any, index: Any, split: str, progress: bool) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """(row positions, probabilities in the model's label order, predictions) of one split."""
    from chestxray.errors import ChestXrayError

    pos = index.split_positions(split)
    if len(pos) == 0:
        raise ChestXrayError(f"the {split} split of {index.root} has no images")
    paths = index.frame["path"].iloc[pos].tolist()
    names = index.frame["image"].iloc[pos].tolist()
    preds = predict_with_progress(analyzer, paths, names, f"{split} split", progress)
    bad = [p for p in preds if not p.ok]
    if bad:
        raise ChestXrayError(
            f"{len(bad)} images of the {split} split could not be read, e.g. {bad[0].file}: {bad[0].error}"
        )
    probs = np.array([[p.probability(lab) for lab in analyzer.labels] for p in preds])
    return pos, probs, names


PROGRESS_EVERY_S = 10.0  # without a terminal: a progress line this often


def predict_with_progress(analyzer: Any, paths: list[Any], names: list[str], desc: str, progress: bool) -> list[Any]:
    """`analyzer.predict` in chunks, reporting with the shared `Progress`: a bar on a terminal,
    a line every 10 s without one (`progress` False: silent)."""
    from chestxray.inference.pipeline import Progress

    bar = Progress(len(paths), desc=desc, every_s=PROGRESS_EVERY_S, enabled=progress)
    preds: list[Any] = []
    step = max(4 * analyzer.batch_size, 64)
    for i in range(0, len(paths), step):
        chunk = analyzer.predict(paths[i : i + step], names=names[i : i + step])
        preds += chunk
        bar.update(len(chunk), errors=sum(not p.ok for p in chunk))
    bar.close()
    return preds


def split_probabilities(
    analyzer: Any, index: Any, split: str, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(probabilities, targets, patient ids, image names) of one split, read from the images
    through the analyzer's own preprocessing (exactly what `predict` does). Targets are in the
    model's label order (a bundle may order or subset its labels), harmonised from the
    dataset's own names; NaN where the dataset does not label a finding."""
    from chestxray.data.harmonise import targets_for
    from chestxray.errors import ChestXrayError

    pos, probs, names = _predict_split(analyzer, index, split, progress)
    targets, sources = targets_for(index.dataset, index.pathologies, index.labels[pos], analyzer.labels)
    if not sources:
        raise ChestXrayError(
            f"model {analyzer.name} predicts none of the findings {index.dataset}:{index.root} labels "
            f"({', '.join(index.pathologies[:8])}...); see `chestxray datasets`"
        )
    return probs, targets, index.frame["patient_id"].iloc[pos].to_numpy(), names


@dataclass
class ScoringPlan:
    """Which findings of a dataset a model is scored on, and how."""

    labels: list[str]  # the findings scored (vocabulary names)
    columns: list[list[int]]  # model outputs per scored finding (several: their maximum)
    thresholds: np.ndarray
    mapping: dict[str, str]  # scored finding -> where its labels and scores come from
    model_only: list[str]  # the model predicts them, the dataset does not label them
    dataset_only: list[str]  # the dataset labels them (own names), the model cannot score them
    identity: bool  # the dataset's own names are the model's labels (e.g. NIH and an NIH model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scored": self.mapping,
            "not_scored_model_only": self.model_only,
            "not_scored_dataset_only": self.dataset_only,
        }


def scoring_plan(model_labels: list[str], thresholds: Any, index: Any) -> ScoringPlan:
    """Model findings the dataset labels (after harmonisation), then findings derived from
    model outputs (`harmonise.DERIVED`, e.g. Nodule or mass = max(Nodule, Mass); threshold:
    the lowest of its parts'), in model order."""
    from chestxray.data.harmonise import DERIVED, mapping_for

    mapping = mapping_for(index.dataset, index.pathologies)
    sources: dict[str, list[str]] = {}
    for own, target in mapping.items():
        if target is not None:
            sources.setdefault(target, []).append(own)
    thresholds = np.asarray(thresholds, dtype=float)
    labels, columns, notes = [], [], {}
    for j, lab in enumerate(model_labels):
        if lab in sources:
            labels.append(lab)
            columns.append([j])
            notes[lab] = " + ".join(sources[lab])
    for target, parts in DERIVED.items():
        if target in sources and target not in labels and all(p in model_labels for p in parts):
            labels.append(target)
            columns.append([model_labels.index(p) for p in parts])
            notes[target] = f"{' + '.join(sources[target])} (model: max of {', '.join(parts)})"
    scored_own = {own for lab in labels for own in sources[lab]}
    return ScoringPlan(
        labels=labels,
        columns=columns,
        thresholds=np.array([thresholds[cols].min() for cols in columns]),
        mapping=notes,
        model_only=[lab for lab in model_labels if lab not in sources],
        dataset_only=[own for own, t in mapping.items() if t is not None and own not in scored_own],
        identity=list(index.pathologies) == list(model_labels),
    )


def curve_figure(
    kind: str,
    targets: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    title: str,
    per_class: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """ROC (`kind` "roc") or precision-recall ("pr") curves as a matplotlib Figure, one panel
    per finding titled with its AUROC or AUPRC (from `per_class`, the `evaluate_predictions`
    entries; computed when not given), with a labelled chance line (the diagonal; the
    prevalence). Classes without positives get an "undefined" panel."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    if per_class is None:
        per_class = evaluate_predictions(targets, probs, np.full(len(labels), 0.5), labels, n_boot=0)["per_class"]
    from chestxray.evaluation.figures import finish_panels, panel_figure

    fig, axes = panel_figure(len(labels))
    for c, name in enumerate(labels):
        ax = axes[c]
        known = ~np.isnan(np.asarray(targets[:, c], dtype=float))  # images that label this finding
        y, p = targets[known, c] > 0.5, probs[known, c]
        metric = "AUROC" if kind == "roc" else "AUPRC"
        ax.set_title(f"{name}: {metric} {_fmt(per_class[name][metric.lower()])}", fontsize=9)
        if not y.any() or y.all():
            ax.text(0.5, 0.5, "undefined\n(no positives)" if not y.any() else "undefined", ha="center", va="center")
            continue
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label="model")
            ax.plot([0, 1], [0, 1], ls=":", c="grey", label="chance (AUROC 0.5)")
            ax.set_xlabel("1 - specificity", fontsize=7)
            ax.set_ylabel("sensitivity", fontsize=7)
        else:
            prec, rec, _ = precision_recall_curve(y, p)
            ax.plot(rec, prec, label="model")
            ax.axhline(y.mean(), ls=":", c="grey", label=f"chance (prevalence {y.mean():.3f})")
            ax.set_xlabel("recall", fontsize=7)
            ax.set_ylabel("precision", fontsize=7)
        ax.legend(loc="lower right" if kind == "roc" else "upper right", fontsize=6, frameon=False)
    finish_panels(fig, axes, len(labels), f"{'ROC' if kind == 'roc' else 'Precision-recall'} curves - {title}")
    return fig


def write_curves(
    targets: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    out: Path,
    title: str,
    per_class: dict[str, dict[str, Any]] | None = None,
) -> list[Path]:
    """roc_curves.png and pr_curves.png (`curve_figure`) in `out`, written atomically."""
    written = []
    for kind in ("roc", "pr"):
        fig = curve_figure(kind, targets, probs, labels, title, per_class)

        def save(tmp: Path, fig: Any = fig) -> None:
            fig.savefig(tmp, format="png")

        written.append(atomic_write(out / f"{kind}_curves.png", save))
    return written


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "undefined" if v is None else format(v, spec)


def _ci(v: list | None) -> str:
    return "" if not v or v[0] is None else f" ({v[0]:.3f}-{v[1]:.3f})"


def report_markdown(result: dict[str, Any], model_name: str, split: str, root: str) -> str:
    m = result["macro"]
    lines = [
        f"# Evaluation of `{model_name}` on the {split_phrase(split)} of `{root}`",
        "",
        f"> {NOT_FOR_CLINICAL_USE}",
        "",
        f"{scored_phrase(result)}, {result['n_patients']} patients. Confidence intervals: 95% bootstrap, "
        f"{result.get('bootstrap', {}).get('replicates', 0)} replicates resampling patients.",
        "",
        f"- **Macro AUROC**: {_fmt(m['auroc'])}{_ci(m.get('auroc_ci'))} over {result['defined_auroc_classes']} "
        "findings with positives",
        f"- Macro AUPRC: {_fmt(m['auprc'])}{_ci(m.get('auprc_ci'))}; macro F1 at the tuned thresholds: {_fmt(m['f1'])}",
        f'- Element-wise accuracy: {result["elementwise_accuracy"]:.4f}, while predicting "all negative" scores '
        f"{result['all_negative_accuracy']:.4f} on the same data. {accuracy_caveat(result)}",
        *transfer_markdown(result),
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
    if result.get("label_mapping"):
        lines += ["", "## Label mapping", "", *[f"    {line}" for line in mapping_lines(result)]]
    lines += ["", "Curves: `roc_curves.png`, `pr_curves.png`.", ""]
    if "calibration" in result:
        lines += calibration_markdown(result)
    return "\n".join(lines)


def split_phrase(split: str) -> str:
    return "whole dataset (every split)" if split == "all" else f"{split} split"


def scored_phrase(result: dict[str, Any]) -> str:
    """ "123 of 624 labelled images scored (the test split)" """
    n, total = result["n_images"], result.get("dataset_labelled_images")
    if total is None or total == n:
        return f"{n} images scored" + (" (every labelled image)" if total == n else "")
    return f"{n} of {total} labelled images scored (the {result['split']} split; --split all scores every one)"


def accuracy_caveat(result: dict[str, Any]) -> str:
    """Why element-wise accuracy misleads, worded for the findings actually scored."""
    n = len(result["per_class"])
    findings = "finding" if n == 1 else f"{n} findings"
    if result["all_negative_accuracy"] >= 0.8:  # mostly-negative cells: "all negative" already scores well
        return f"Accuracy over {'one rare finding' if n == 1 else f'{n} mostly rare findings'} says little; read AUROC and AUPRC."
    return f"Accuracy depends on the threshold and prevalence of the {findings} scored; read AUROC and AUPRC."


# Thresholds that do not transfer: when, at the model's own thresholds, a dataset gets far
# more (or fewer) positive calls than it has positives, they were tuned on another population.
TRANSFER_MIN_IMAGES = 20  # the rate rule needs this many labelled images of a finding
TRANSFER_MIN_CLASS = 20  # the specificity / sensitivity rule needs this many negatives / positives
TRANSFER_RULE = (
    "at the model's thresholds, on the images that label a finding: predicted-positive rate above "
    "2 x prevalence + 0.1 or below (prevalence - 0.1) / 2 (with at least 20 labelled images), "
    "or specificity below 0.2 (with at least 20 negatives), or sensitivity below 0.2 (with at least 20 positives)"
)


def threshold_transfer_warning(per_class: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A warning when the model's thresholds do not fit this dataset, or None.

    Rule, per scored finding, on the images that label it, at the model's thresholds (with
    `rate` the predicted-positive rate and `prev` the prevalence):
      - too many positive calls: rate > 2 * prev + 0.1 (at least 20 labelled images), or
        specificity < 0.2 (at least 20 negatives);
      - too few: rate < (prev - 0.1) / 2 (at least 20 labelled images), or sensitivity
        < 0.2 (at least 20 positives).
    The minimum counts keep a handful of images from raising it. The cure is a site-specific
    operating point: `chestxray tune` on labelled images of this population."""
    flagged: dict[str, dict[str, Any]] = {}
    for name, e in per_class.items():
        pos, neg = e["tp"] + e["fn"], e["fp"] + e["tn"]
        n = pos + neg
        if n == 0:
            continue
        rate, prev = (e["tp"] + e["fp"]) / n, pos / n
        reasons = []
        if n >= TRANSFER_MIN_IMAGES and not (prev - 0.1) / 2 <= rate <= 2 * prev + 0.1:
            reasons.append(f"{rate:.0%} called positive, prevalence {prev:.0%}")
        if neg >= TRANSFER_MIN_CLASS and e["specificity"] is not None and e["specificity"] < 0.2:
            reasons.append(f"specificity {e['specificity']:.3f}")
        if pos >= TRANSFER_MIN_CLASS and e["recall"] is not None and e["recall"] < 0.2:
            reasons.append(f"sensitivity {e['recall']:.3f}")
        if reasons:
            flagged[name] = {
                "predicted_positive_rate": rate,
                "prevalence": prev,
                "specificity": e["specificity"],
                "sensitivity": e["recall"],
                "why": "; ".join(reasons),
            }
    if not flagged:
        return None
    why = "; ".join(f"{k}: {v['why']}" for k, v in flagged.items())
    return {
        "findings": flagged,
        "rule": TRANSFER_RULE,
        "message": f"the model's thresholds do not transfer to this dataset for {', '.join(flagged)} ({why}); "
        "tune a site-specific operating point on labelled images of this population: "
        "chestxray tune --model MODEL ROOT --split val --out NEW_MODEL (--split all: every labelled image)",
    }


def transfer_markdown(result: dict[str, Any]) -> list[str]:
    w = result.get("threshold_warning")
    if not w:
        return []
    return [f"- **Warning**: {w['message']}. Rule: {w['rule']}."]


def calibration_markdown(result: dict[str, Any]) -> list[str]:
    cal = result["calibration"]
    m = cal["macro"]
    lines = [
        "## Calibration",
        "",
        f"Probabilities {'after the bundle calibrator (' + cal['calibrator'] + ')' if cal['calibrator'] else 'as the model gives them (no calibrator in the bundle)'}. "
        f"Macro Brier score {_fmt(m['brier'], '.4f')}, macro expected calibration error (ECE) {_fmt(m['ece'], '.4f')}; "
        f"ECE binning: {cal['binning']}. Reliability diagram: `reliability.png`.",
    ]
    op = result.get("operating_point")
    if op:
        lines += ["", f"Thresholds: policy `{op['policy']}`, tuned on {op.get('tuned_on') or 'validation'}."]
    lines += ["", "| finding | Brier | ECE |", "|---|---:|---:|"]
    for name, e in cal["per_class"].items():
        lines.append(f"| {name} | {_fmt(e['brier'], '.4f')} | {_fmt(e['ece'], '.4f')} |")
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
    from chestxray.data.harmonise import harmonise
    from chestxray.errors import ChestXrayError
    from chestxray.evaluation.calibration import calibration_metrics, write_reliability
    from chestxray.evaluation.subgroups import evaluate_subgroups, subgroups_markdown

    plan = scoring_plan(list(analyzer.labels), analyzer.thresholds, index)
    if not plan.labels:
        raise ChestXrayError(
            f"model {analyzer.name} shares no finding with {index.dataset}:{index.root} "
            f"(it labels {', '.join(index.pathologies[:8])}...); see `chestxray datasets`"
        )
    pos, model_probs, _ = _predict_split(analyzer, index, split, progress)
    findings, matrix, _ = harmonise(index.dataset, index.pathologies, index.labels[pos])
    targets = matrix[:, [findings.index(f) for f in plan.labels]]
    probs = np.stack([model_probs[:, cols].max(axis=1) for cols in plan.columns], axis=1)
    groups = index.frame["patient_id"].iloc[pos].to_numpy()
    log.info("metrics of %d findings on %d images (%d bootstrap replicates)", len(plan.labels), len(pos), n_boot)
    result = evaluate_predictions(targets, probs, plan.thresholds, plan.labels, groups=groups, n_boot=n_boot, seed=seed)
    result = {
        "model": analyzer.name,
        "split": split,
        "dataset_root": str(index.root),
        "note": NOT_FOR_CLINICAL_USE,
        **result,
        "dataset_labelled_images": labelled_images(index),
    }
    warning = threshold_transfer_warning(result["per_class"])
    if warning is not None:
        result["threshold_warning"] = warning
    meta = analyzer.meta
    calibrator = (getattr(meta, "calibration", None) or {}).get("method")
    result["calibration"] = {"calibrator": calibrator, **calibration_metrics(targets, probs, plan.labels)}
    if getattr(meta, "operating_point", None):
        result["operating_point"] = {k: meta.operating_point.get(k) for k in ("policy", "tuned_on")}
    if not plan.identity:
        result["dataset"] = index.dataset
        result["label_mapping"] = plan.to_dict()
    frame = index.frame.iloc[pos]
    columns = [c for c in ("sex", "age", "view") if c in frame.columns] if by is None else by
    if columns:
        log.info("subgroups by %s", ", ".join(columns))
        result["subgroups"] = evaluate_subgroups(
            targets, probs, groups, frame, plan.labels, columns, result, n_boot=n_boot, seed=seed
        )
    out.mkdir(parents=True, exist_ok=True)
    log.info("writing %s", out)
    title = f"{analyzer.name}, {split_phrase(split)}"
    write_curves(targets, probs, plan.labels, out, title, result["per_class"])
    write_reliability(targets, probs, plan.labels, out, title)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    md = report_markdown(result, analyzer.name, split, str(index.root))
    if "subgroups" in result:
        md += "\n" + subgroups_markdown(result["subgroups"], plan.labels)
    atomic_write_text(out / "report.md", md)
    return result


def labelled_images(index: Any) -> int:
    """Images of the dataset (every split) with a file and at least one known label."""
    return int(index.labelled_mask().sum())


def mapping_lines(result: dict[str, Any]) -> list[str]:
    """How an external dataset's labels were matched to the model's findings (for printing)."""
    m = result.get("label_mapping")
    if not m:
        return []
    lines = [f"findings scored on {result['dataset']} (finding <- dataset label):"]
    lines += [f"  {k:<22} <- {v}" for k, v in m["scored"].items()]
    if m["not_scored_model_only"]:
        lines.append("not scored, not labelled by the dataset: " + ", ".join(m["not_scored_model_only"]))
    if m["not_scored_dataset_only"]:
        lines.append("not scored, not predicted by the model: " + ", ".join(m["not_scored_dataset_only"]))
    return lines
