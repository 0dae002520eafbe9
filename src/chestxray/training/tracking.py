"""Watching a run: progress lines without a terminal, TensorBoard scalars, and `curves.png` +
`summary.md` rewritten (atomically) after every epoch. Only the main process creates a Tracker."""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.errors import ChestXrayError
from chestxray.training.rundir import CURVES, SUMMARY, TENSORBOARD_DIR, save_atomically


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class EpochProgress:
    """A tqdm bar on a terminal; otherwise one line every `every` steps on stderr (batch jobs, CI)."""

    def __init__(self, total: int, epoch: int, epochs: int, every: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.total, self.epoch, self.epochs, self.every = total, epoch, epochs, every
        self.tty = sys.stderr.isatty()
        self.lines = enabled and not self.tty and every > 0
        self.bar = tqdm(
            total=total,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="batch",
            disable=not (enabled and self.tty),
            leave=False,
        )
        self.step, self.images, self.start = 0, 0, time.perf_counter()

    def update(self, n_images: int, mean_loss: float) -> None:
        self.step += 1
        self.images += n_images
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}")
        if self.lines and (self.step % self.every == 0 or self.step == self.total):
            elapsed = time.perf_counter() - self.start
            rate = self.images / max(elapsed, 1e-9)
            eta = elapsed / self.step * (self.total - self.step)
            print(
                f"epoch {self.epoch + 1}/{self.epochs}  step {self.step}/{self.total}  loss {mean_loss:.4f}  "
                f"{rate:.1f} img/s  epoch ETA {_eta(eta)}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


class Tracker:
    """The main process's view of a run: TensorBoard (optional) and the run folder's pictures."""

    def __init__(
        self, out: Path, options: dict[str, Any], labels: list[str], tensorboard: bool | None, purge_step: int | None
    ) -> None:
        self.out, self.options, self.labels = out, options, labels
        if tensorboard and not tensorboard_available():
            raise ChestXrayError("tensorboard=True needs the tensorboard package: pip install 'chestxray[track]'")
        self.writer: Any = None
        if tensorboard or (tensorboard is None and tensorboard_available()):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run logged after its last checkpoint (on --resume).
            self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=purge_step)

    # ---- TensorBoard --------------------------------------------------------------------------
    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss_step", loss, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)

    def epoch(self, row: dict[str, Any], per_class: np.ndarray, gpu_memory: float | None) -> None:
        if self.writer is not None:
            e = int(row["epoch"])
            w = self.writer
            w.add_scalar("train/loss", row["train_loss"], e)
            w.add_scalar("val/loss", row["val_loss"], e)
            if row["val_mean_auroc"] is not None:
                w.add_scalar("val/auroc_macro", row["val_mean_auroc"], e)
            for name, value in zip(self.labels, per_class):
                if np.isfinite(value):
                    w.add_scalar(f"val_auroc/{name}", float(value), e)
            w.add_scalar("val/elementwise_accuracy", row["val_elementwise_accuracy"], e)
            w.add_scalar("epoch/lr", row["lr"], e)
            w.add_scalar("epoch/images_per_second", row["images_per_second"], e)
            if gpu_memory is not None:
                w.add_scalar("epoch/gpu_max_memory_gib", gpu_memory, e)
            w.flush()

    def roc_images(self, targets: np.ndarray, probs: np.ndarray, epoch: int) -> None:
        """The validation ROC curves of the kept weights, all findings on one small figure (the
        per-finding panels of `chestxray evaluate` take seconds to draw; this is a glance)."""
        if self.writer is None:
            return
        self.writer.add_figure("val/roc_curves", roc_figure(targets, probs, self.labels, epoch), epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    # ---- the run folder -----------------------------------------------------------------------
    def write_files(self, history: list[dict[str, Any]], best_epoch: int, final: dict[str, Any] | None = None) -> None:
        if history:
            save_atomically(self.out / CURVES, lambda p: plot_history(history, best_epoch, p, self._title()))
        save_atomically(self.out / SUMMARY, lambda p: p.write_text(summary_markdown(self.options, history, final)))

    def _title(self) -> str:
        o = self.options
        what = f"{o['model']} {o['image_size']} px, recipe {o.get('recipe', 'seed')}"
        return f"{o['name']}: {what}" if o.get("name") else what


def roc_figure(targets: np.ndarray, probs: np.ndarray, labels: list[str], epoch: int) -> Any:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    from chestxray.evaluation.metrics import per_class_auroc

    fig = Figure(figsize=(6.5, 5), dpi=80)
    ax = fig.subplots()
    for c, (name, auc) in enumerate(zip(labels, per_class_auroc(targets, probs))):
        if np.isfinite(auc):  # undefined without positives (or negatives)
            fpr, tpr, _ = roc_curve(targets[:, c] > 0.5, probs[:, c])
            ax.plot(fpr, tpr, lw=1, color=f"C{c % 10}", ls="-" if c < 10 else "--", label=f"{name} {auc:.2f}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"validation ROC, kept epoch {epoch}")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def plot_history(history: list[dict[str, Any]], best_epoch: int, path: Path, title: str) -> None:
    """Loss, validation AUROC and learning rate against epoch, the kept (best) epoch marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    auroc = [np.nan if h["val_mean_auroc"] is None else h["val_mean_auroc"] for h in history]
    fig = Figure(figsize=(12, 3.6), dpi=80)
    FigureCanvasAgg(fig)
    ax_loss, ax_auc, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax_loss.set_ylabel("BCE loss")
    ax_auc.plot(epochs, auroc, "s-", color="C2", label="validation")
    ax_auc.set_ylabel("macro AUROC")
    ax_auc.axhline(0.5, ls=":", color="grey", label="chance")
    ax_lr.plot(epochs, [h["lr"] for h in history], "o-", color="C4")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    if min(h["lr"] for h in history) > 0:
        ax_lr.set_yscale("log")
    best = best_epoch + 1
    for ax in (ax_loss, ax_auc, ax_lr):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if best >= 1:
            ax.axvline(best, ls="--", color="red", lw=1, label=f"kept: epoch {best}")
        if len(epochs) < 12:
            ax.set_xticks(epochs)
    ax_loss.legend(fontsize=8)
    ax_auc.legend(fontsize=8)
    ax_loss.set_title("loss")
    ax_auc.set_title("validation AUROC")
    ax_lr.set_title("learning rate")
    fig.suptitle(f"{title} (kept epoch = lowest validation loss)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _f(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def summary_markdown(options: dict[str, Any], history: list[dict[str, Any]], final: dict[str, Any] | None) -> str:
    o = options
    lines = [f"# Training run {o.get('name') or ''}".rstrip(), ""]
    status = "finished" if final else f"in progress: epoch {len(history)} of {o['epochs']} done"
    lines.append(f"Status: **{status}**. Options in full: `config.yaml`; per epoch: `log.jsonl`, `curves.png`.")
    lines.append("")
    lines += [
        "| option | value |",
        "|---|---|",
        f"| model | {o['model']} (weights {o['weights']}, freeze {o['freeze']}) |",
        f"| recipe | {o.get('recipe', 'seed')} |",
        f"| data | {o['root']} (validation fraction {o['val_fraction']}, split seed {o['split_seed']}) |",
        f"| image size | {o['image_size']} px |",
        f"| optimiser | {o['optimizer']}, lr {o['lr']:g}, weight decay {o['weight_decay']:g}, schedule {o['schedule']} |",
        f"| epochs, batch | {o['epochs']}, {o['batch_size']} |",
        f"| augmentation, pos weight | {o['augment']}, {o['pos_weight']} |",
        f"| seed, device | {o['seed']}, {o['device']} |",
        "",
    ]
    if history:
        best = min(history, key=lambda h: h["val_loss"])
        seconds = sum(h["seconds"] for h in history)
        ips = float(np.mean([h["images_per_second"] for h in history]))
        lines += [
            f"Best epoch (lowest validation loss): **{best['epoch']}**, validation loss {_f(best['val_loss'])}, "
            f"validation macro AUROC {_f(best['val_mean_auroc'])}.",
            f"Time: {seconds:.0f} s for {len(history)} epochs (training and validation); "
            f"training throughput {ips:.1f} images/s (mean over epochs).",
            "",
            "| epoch | train loss | val loss | val macro AUROC | val accuracy | lr | s | img/s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for h in history:
            lines.append(
                f"| {h['epoch']}{' *' if h['epoch'] == best['epoch'] else ''} | {_f(h['train_loss'])} | "
                f"{_f(h['val_loss'])} | {_f(h['val_mean_auroc'])} | {_f(h['val_elementwise_accuracy'])} | "
                f"{h['lr']:.2e} | {h['seconds']:.1f} | {h['images_per_second']:.1f} |"
            )
        lines.append("")
    if final:
        macro = final.get("macro", {})
        lines += [
            "## Validation metrics of the kept weights",
            "",
            f"Thresholds tuned per finding on the validation split (F1-optimal). Macro AUROC "
            f"{_f(macro.get('auroc'))}, AUPRC {_f(macro.get('auprc'))}, F1 {_f(macro.get('f1'))}.",
            "",
            "| finding | support | AUROC | AUPRC | threshold | F1 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, m in final.get("per_class", {}).items():
            lines.append(
                f"| {name} | {m['support']} | {_f(m['auroc'], '.3f')} | {_f(m['auprc'], '.3f')} | "
                f"{_f(m['threshold'], '.3f')} | {_f(m['f1'], '.3f')} |"
            )
        lines.append("")
    return "\n".join(lines)
