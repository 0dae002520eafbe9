"""`chestxray runs DIR...`: training runs side by side (a table, CSV or JSON), and their
validation curves overlaid in one picture. Reads only the run folders' text files (no torch)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from chestxray.errors import ChestXrayError
from chestxray.training.rundir import run_config_file

FORMATS = ("table", "csv", "json")
COLUMNS = (
    "run",
    "status",
    "model",
    "recipe",
    "data",
    "image_size",
    "epochs",
    "best_epoch",
    "val_auroc",
    "best_val_auroc",
    "test_auroc",
    "time_s",
    "images_per_s",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "runs",
        help="compare training runs: model, data, size, epochs, validation/test AUROC, time",
        description="Lists the training runs in or below each DIR (folders with config.yaml or config.json "
        "and log.jsonl). val_auroc is the validation macro AUROC of the kept epoch (lowest validation "
        "loss), best_val_auroc the highest over epochs, test_auroc the macro AUROC of a `chestxray "
        "evaluate --split test` result saved inside the run folder, if any.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folders, or folders holding runs")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    p.add_argument("--out", help="write the table/CSV/JSON to this file (atomically) instead of stdout")
    p.add_argument("--plot", metavar="OUT.png", help="overlay the runs' validation AUROC and loss curves")
    p.set_defaults(run=run)


def find_runs(dirs: list[str]) -> list[Path]:
    found: list[Path] = []
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise ChestXrayError(f"{folder}: no such folder")
        logs = [folder / "log.jsonl"] if (folder / "log.jsonl").is_file() else sorted(folder.rglob("log.jsonl"))
        runs = [p.parent for p in logs if run_config_file(p.parent) is not None]
        if not runs:
            raise ChestXrayError(f"{folder}: no training runs (folders with config.yaml or config.json and log.jsonl)")
        found += [r for r in runs if r not in found]
    return found


def _history(run: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate((run / "log.jsonl").read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ChestXrayError(f"{run / 'log.jsonl'}: line {n} is not JSON") from None
    return rows


def _test_auroc(run: Path) -> float | None:
    """Macro AUROC of an evaluation of the test split saved in the run folder (evaluate --out RUN/...)."""
    for path in sorted(run.glob("*/metrics.json")) + sorted(run.glob("metrics.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("split") == "test":
            value = (data.get("macro") or {}).get("auroc")
            if isinstance(value, (int, float)):
                return float(value)
    return None


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def read_run(run: Path) -> dict[str, Any]:
    """One run's row; a run whose files cannot be read is a `broken` row with the reason."""
    try:
        return _read_run(run)
    except ChestXrayError as exc:
        reason = str(exc)
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    reason = reason.splitlines()[0][:200] if reason else "unreadable"
    return {**{c: None for c in COLUMNS}, "run": str(run), "status": "broken", "problem": reason, "history": []}


def _read_run(run: Path) -> dict[str, Any]:
    from chestxray.training.config import read_run_config

    record = read_run_config(run) or {"options": {}}
    o = record["options"]
    if not isinstance(o, dict):
        raise ChestXrayError(f"{run}: its config holds no mapping of options")
    roots = o.get("root") if isinstance(o.get("root"), list) else [o["root"]] if o.get("root") else []
    history = _history(run)
    if not all(isinstance(h, dict) and isinstance(h.get("val_loss"), (int, float)) for h in history):
        raise ChestXrayError(f"{run / 'log.jsonl'}: a row without a numeric val_loss")
    kept = min(history, key=lambda h: h["val_loss"]) if history else None
    aurocs = _finite([h.get("val_mean_auroc") for h in history])
    speeds = _finite([h.get("images_per_second") for h in history])
    return {
        "run": str(run),
        "status": "finished" if (run / "model.safetensors").is_file() else "partial",
        "model": o.get("model"),
        "recipe": o.get("recipe", "seed"),
        "data": "+".join(Path(str(r)).name for r in roots) if roots else None,
        "image_size": o.get("image_size"),
        "epochs": f"{len(history)}/{o.get('epochs', '?')}",
        "best_epoch": kept["epoch"] if kept else None,
        "val_auroc": kept.get("val_mean_auroc") if kept else None,
        "best_val_auroc": max(aurocs) if aurocs else None,
        "test_auroc": _test_auroc(run),
        "time_s": round(sum(_finite([h.get("seconds") for h in history])), 1),
        "images_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "history": history,
    }


def _cell(column: str, v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if "auroc" in column and isinstance(v, float) else str(v)


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    table = [{c: r[c] for c in COLUMNS} for r in rows]
    if fmt == "json":
        for entry, r in zip(table, rows):
            if "problem" in r:
                entry["problem"] = r["problem"]
        return json.dumps(table, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        return buf.getvalue()
    cells = [[_cell(c, r[c]) for c in COLUMNS] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines += [f"{r['run']}: broken: {r['problem']}" for r in rows if "problem" in r]
    return "\n".join(lines) + "\n"


def plot_runs(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation macro AUROC and loss against epoch, one line per run, kept epochs marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=80)
    FigureCanvasAgg(fig)
    ax_auc, ax_loss = fig.subplots(1, 2)
    for i, r in enumerate(rows):
        h = r["history"]
        if not h:
            continue
        epochs = [x["epoch"] for x in h]
        auroc = [math.nan if x.get("val_mean_auroc") is None else x["val_mean_auroc"] for x in h]
        label = Path(r["run"]).name
        ax_auc.plot(epochs, auroc, "o-", color=f"C{i % 10}", label=label, ms=3)
        ax_loss.plot(epochs, [x["val_loss"] for x in h], "o-", color=f"C{i % 10}", label=label, ms=3)
        if r["best_epoch"] is not None:
            k = epochs.index(r["best_epoch"])
            ax_auc.plot([epochs[k]], [auroc[k]], "*", color=f"C{i % 10}", ms=12)
            ax_loss.plot([epochs[k]], [h[k]["val_loss"]], "*", color=f"C{i % 10}", ms=12)
    ax_auc.axhline(0.5, ls=":", color="grey", label="chance")
    ax_auc.set(xlabel="epoch", ylabel="validation macro AUROC", title="validation AUROC (star: kept epoch)")
    ax_loss.set(xlabel="epoch", ylabel="validation BCE loss", title="validation loss (star: kept epoch)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_auc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_auc.legend(fontsize=8)
    fig.tight_layout()
    from chestxray.io import atomic_write

    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
    except OSError as exc:
        raise ChestXrayError(f"cannot write {path}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    rows = [read_run(r) for r in find_runs(args.dirs)]
    text = render(rows, args.format)
    if args.out:
        from chestxray.io import atomic_write_text

        try:
            atomic_write_text(args.out, text)
        except OSError as exc:
            raise ChestXrayError(f"cannot write {args.out}: {exc.strerror or exc}") from None
        print(f"wrote {len(rows)} runs ({args.format}) to {args.out}")
    else:
        print(text, end="")
    if args.plot:
        plot_runs(rows, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0
