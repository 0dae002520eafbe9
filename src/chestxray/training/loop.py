"""The training loop: cache -> device batches -> augment on device -> model, with
checkpoints each epoch (atomic), exact resume, best-by-validation-loss selection,
threshold tuning and a bundle at the end. Runs on CPU, one GPU, or under torchrun (DDP).
The run folder's rules live in `rundir`, options files and recipes in `config`, and
TensorBoard / curves / summary / progress lines in `tracking`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chestxray.data.loader import CacheBatches, to_model_input
from chestxray.data.transforms import AugmentConfig, BatchAugment
from chestxray.errors import ChestXrayError
from chestxray.evaluation.metrics import elementwise_accuracy, mean_auroc, per_class_auroc
from chestxray.evaluation.thresholds import tune_thresholds
from chestxray.models.bundle import BundleMeta, save_bundle
from chestxray.models.device import resolve_device
from chestxray.models.registry import create_model, get_spec, train_mode
from chestxray.training.config import TrainConfig, check_config, dump_yaml, run_record, short
from chestxray.training.distributed import DistInfo, all_mean, barrier, gather_rows, init_distributed, shutdown
from chestxray.training.losses import MaskedBCEWithLogitsLoss, masked_bce_with_logits
from chestxray.training.multidata import dataset_label, describe, load_parts, root_list, split_data
from chestxray.training.rundir import (
    BEST_WEIGHTS,
    BUNDLE,
    CHECKPOINT,
    CONFIG,
    LOG_FILE,
    check_out,
    clear_run,
    make_out,
    read_checkpoint,
    remove_new_out,
    save_atomically,
    save_text,
    writing,
)
from chestxray.training.tracking import EpochProgress, Tracker

log = logging.getLogger(__name__)

__all__ = ["BEST_WEIGHTS", "CHECKPOINT", "LOG_FILE", "TrainConfig", "Trainer", "autocast_for", "train", "training_step"]


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_mean_auroc: float | None
    val_elementwise_accuracy: float
    lr: float
    seconds: float
    images_per_second: float
    extra: dict[str, Any] = field(default_factory=dict)


def _same_layout(fresh: Any, saved: Any) -> bool:
    """A saved scheduler state has the keys and value kinds of this run's own (torch's
    `load_state_dict` takes any mapping and fails at the next step)."""
    if not isinstance(saved, dict) or set(saved) != set(fresh):
        return False
    for key, mine in fresh.items():
        theirs = saved[key]
        if mine is None or theirs is None:
            continue
        if isinstance(mine, (int, float)) and not isinstance(mine, bool):
            if isinstance(theirs, bool) or not isinstance(theirs, (int, float)):
                return False
        elif isinstance(mine, (list, tuple)):
            if not isinstance(theirs, (list, tuple)) or len(theirs) != len(mine):
                return False
        elif not isinstance(theirs, type(mine)):
            return False
    return True


def rank_device(name: str, info: DistInfo) -> torch.device:
    """The policy's device (`models.device.resolve_device`); under DDP, this rank's GPU."""
    if name.startswith("cuda") and info.enabled:
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    raise ChestXrayError(f"unknown optimizer {cfg.optimizer!r}; choose adam, adamw or sgd")


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=max(1, steps_per_epoch)
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    if cfg.schedule == "none":
        return None
    raise ChestXrayError(f"unknown schedule {cfg.schedule!r}; choose plateau, onecycle, cosine or none")


def _pos_weight(cfg: TrainConfig, labels: np.ndarray) -> torch.Tensor | None:
    if cfg.pos_weight == "none":
        return None
    if cfg.pos_weight != "balanced":
        raise ChestXrayError(f"unknown pos_weight={cfg.pos_weight!r}; choose none or balanced")
    pos = np.nansum(labels, 0)
    known = np.isfinite(labels).sum(0)  # unknown labels count as neither
    # negatives / positives per class, capped so a class with 1-2 positives cannot dominate.
    return torch.tensor(np.clip((known - pos) / np.maximum(pos, 1), 1.0, 50.0), dtype=torch.float32)


def sanity_check_batch(x: torch.Tensor, y: torch.Tensor, size: int, n_classes: int) -> None:
    """Cheap check of the first batch: shape, value range, label values."""
    if x.ndim != 4 or x.shape[1:] != (1, size, size):
        raise ChestXrayError(f"first batch has shape {tuple(x.shape)}, expected (B, 1, {size}, {size})")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0 or hi - lo < 1e-3:
        raise ChestXrayError(f"first batch pixel range [{lo:.3f}, {hi:.3f}] is not a [0, 1] image range")
    if y.shape[1] != n_classes or not torch.all((y == 0) | (y == 1) | torch.isnan(y)):
        raise ChestXrayError(f"first batch labels are not 0/1/unknown with {n_classes} columns")


def autocast_for(device: torch.device, enabled: bool) -> Any:
    """bf16 autocast on `device` (the GPU path; also runs on CPU, where tests exercise it)."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(
    net: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Any,
) -> torch.Tensor:
    """One optimisation step (shared with benchmarks/train_throughput.py)."""
    with autocast:
        logits = net(x)
    loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.init:  # the bundle brings the architecture, the weights and (unless given) the input size
            from chestxray.training.init import config_for_init

            cfg = config_for_init(cfg)
        else:
            check_config(cfg.weights, cfg.freeze)
        if cfg.image_size is None:  # as timm's resolve_data_config: the model's config decides
            cfg = dataclasses.replace(cfg, image_size=get_spec(cfg.model).preprocessing.size)
        self.cfg = cfg
        self.size: int = int(cfg.image_size or 0)
        self.out = Path(cfg.out)
        self.tracker: Tracker | None = None
        device = resolve_device(cfg.device)
        self.info = init_distributed(device)
        self.device = rank_device(device, self.info)
        self.on_gpu = self.device.type == "cuda"

    # ---- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.parts, self.labels_names = load_parts(cfg, self.info)
        train_data, val_data = split_data(self.parts, "train", cfg.loader), split_data(self.parts, "val", cfg.loader)
        tr_x, tr_y = train_data.images, train_data.targets
        va_x, va_y, self.val_groups = val_data.images, val_data.targets, val_data.groups
        self.val_targets, self.val_sources = va_y, val_data.sources
        common: dict[str, Any] = dict(rank=self.info.rank, world_size=self.info.world_size, device=self.device)
        self.train_batches = CacheBatches(
            tr_x,
            tr_y,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            drop_last=len(tr_x) > cfg.batch_size * self.info.world_size,
            **common,
        )
        self.val_batches = CacheBatches(va_x, va_y, cfg.batch_size * 2, shuffle=False, **common)
        # Random init must not depend on, or change, the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.init:
                self.model = self._init_model()
            else:
                self.model = create_model(
                    cfg.model,
                    num_classes=len(self.labels_names),
                    weights=cfg.weights,
                    freeze=cfg.freeze,
                    image_size=cfg.image_size,
                )
        self.model.to(self.device)
        if self.on_gpu and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, params)
        steps = len(self.train_batches) if cfg.max_steps is None else min(cfg.max_steps, len(self.train_batches))
        self.steps_per_epoch = steps
        self.scheduler = make_scheduler(cfg, self.optimizer, steps)
        pw = _pos_weight(cfg, tr_y)
        # Masked: a label a dataset does not give (NaN) adds nothing to the loss.
        self.criterion = MaskedBCEWithLogitsLoss(pos_weight=pw.to(self.device) if pw is not None else None)
        aug = AugmentConfig.preset(cfg.augment)
        self.augment = BatchAugment(aug, seed=cfg.seed, device=self.device) if aug else None
        self.net: nn.Module = self.model
        if self.info.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.on_gpu else None
            )
        self.forward = torch.compile(self.net) if cfg.compile else self.net
        self.start_epoch, self.best_loss, self.best_epoch = 0, math.inf, -1
        self.history: list[dict[str, Any]] = []
        self.n_train, self.n_val = len(tr_x), len(va_x)

    def _init_model(self) -> Any:
        """The --init bundle's network, its output rows remapped to this run's labels."""
        from chestxray.training.init import init_from_bundle

        model, remap, arch = init_from_bundle(
            str(self.cfg.init), self.labels_names, freeze=self.cfg.freeze, image_size=self.cfg.image_size
        )
        if self.info.is_main:
            log.info("--init %s (%s): %s", self.cfg.init, arch, remap.describe())
            if model.preprocessing.crop == "center":
                log.info(
                    "the bundle centre-crops at prediction: training reads a centre-cropped cache "
                    "(resized with antialiased bilinear; prediction keeps the bundle's own resize, %s)",
                    model.preprocessing.resize,
                )
        return model

    def _autocast(self):
        return autocast_for(self.device, self.on_gpu and self.cfg.amp)

    def _prep(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = to_model_input(x_u8)
        if self.on_gpu and self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # ---- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, epoch: int) -> None:
        if not self.info.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": epoch,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "history": json.dumps(self.history),
            "args": json.dumps(self.cfg.to_dict()),
        }
        save_atomically(self.out / CHECKPOINT, lambda p: torch.save(state, p))
        self.checkpointed = True

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        # weights_only: tensors, numbers and strings only; no arbitrary pickled objects.
        state = read_checkpoint(path, self.device)

        def bad(what: str, exc: BaseException | None = None) -> ChestXrayError:
            reason = f" ({type(exc).__name__}: {short(str(exc).splitlines()[0] if str(exc) else '')})" if exc else ""
            return ChestXrayError(f"resume=True: {path}: {what}{reason}; start again with overwrite=True")

        try:
            saved = json.loads(state["args"])
            history = json.loads(state["history"])
        except (TypeError, ValueError):
            raise bad("its args and history are not the JSON text a chestxray checkpoint holds") from None
        if not isinstance(saved, dict) or not isinstance(history, list):
            raise bad("its args or history have the wrong shape")
        for key in ("model", "image_size", "freeze", "epochs", "batch_size", "seed", "augment", "schedule"):
            if saved.get(key) != getattr(self.cfg, key):
                raise ChestXrayError(
                    f"resume=True: checkpoint {path} was made with {key}={short(saved.get(key))}, "
                    f"this run has {key}={getattr(self.cfg, key)!r}"
                )
        numbers: dict[str, Any] = {}
        for key, kind in (("epoch", int), ("best_epoch", int), ("best_loss", float)):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise bad(f"{key} is {short(value)}, not a number")
            numbers[key] = kind(value)
        if not 0 <= numbers["epoch"] < self.cfg.epochs or numbers["best_epoch"] > numbers["epoch"]:
            raise bad(
                f"epoch {numbers['epoch']} / best_epoch {numbers['best_epoch']} do not fit {self.cfg.epochs} epochs"
            )
        if not isinstance(state["model"], dict) or not isinstance(state["optimizer"], dict):
            raise bad("model or optimizer state is not a mapping")
        # torch checks shapes and keys; its messages run to many lines, so only their first is kept.
        for what, target, value in (
            ("the model weights do not fit", self.model, state["model"]),
            ("the optimizer state does not fit", self.optimizer, state["optimizer"]),
            ("the scheduler state does not fit", self.scheduler, state.get("scheduler")),
        ):
            if target is None or value is None:
                continue
            if target is self.scheduler and not _same_layout(target.state_dict(), value):
                raise bad(what + f" ({type(target).__name__})")
            try:
                target.load_state_dict(value)
            except Exception as exc:
                raise bad(what, exc) from None
        # torch loads optimizer moments of any shape and fails at the first step; check them now.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                moments = self.optimizer.state.get(p, {})
                if any(torch.is_tensor(t) and t.ndim > 0 and t.shape != p.shape for t in moments.values()):
                    raise bad("the optimizer state does not fit (moment shapes differ from the weights)")
        self.start_epoch = numbers["epoch"] + 1
        self.best_loss, self.best_epoch = numbers["best_loss"], numbers["best_epoch"]
        self.history = history
        log.info("resumed from %s at epoch %d", path, self.start_epoch + 1)

    # ---- loop --------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[float, float]:
        train_mode(self.model)
        self.train_batches.set_epoch(epoch)
        if self.augment is not None:
            self.augment.reseed(self.cfg.seed * 100_003 + epoch)
        total, count, start = 0.0, 0, time.perf_counter()
        bar = EpochProgress(self.steps_per_epoch, epoch, self.cfg.epochs, self.cfg.log_every, self.info.is_main)
        for step, (_, xb, yb) in enumerate(self.train_batches):
            if step >= self.steps_per_epoch:
                break
            x = self._prep(xb)
            if self.augment is not None:
                x = self.augment(x)
            if epoch == self.start_epoch and step == 0:
                sanity_check_batch(x, yb, self.size, len(self.labels_names))
            loss = training_step(self.forward, self.optimizer, self.criterion, x, yb, self._autocast())
            if self.scheduler is not None and self.cfg.schedule != "plateau":
                self.scheduler.step()
            step_loss = float(loss.detach())
            total += step_loss * len(yb)
            count += len(yb)
            bar.update(len(yb), total / max(count, 1))
            if self.tracker is not None:
                lr = self.optimizer.param_groups[0]["lr"]
                self.tracker.step(epoch * self.steps_per_epoch + step + 1, step_loss, lr)
        bar.close()
        seconds = time.perf_counter() - start
        loss_mean = all_mean(total / max(count, 1), self.info)
        return loss_mean, count * self.info.world_size / max(seconds, 1e-9)

    @torch.no_grad()
    def predict_val(self) -> tuple[np.ndarray, float]:
        """Validation probabilities (all ranks' rows, in split order) and mean BCE loss."""
        self.model.eval()
        rows_all: list[np.ndarray] = []
        probs_all: list[np.ndarray] = []
        loss_sum, known = 0.0, 0
        for rows_t, xb, yb in self.val_batches:
            with self._autocast():
                logits = self.model(self._prep(xb)).float()
            loss_sum += float(masked_bce_with_logits(logits, yb, reduction="sum"))
            known += int((~torch.isnan(yb)).sum())
            rows_all.append(rows_t.numpy())
            probs_all.append(torch.sigmoid(logits).cpu().numpy())
        rows = np.concatenate(rows_all) if rows_all else np.zeros(0, dtype=np.int64)
        probs = np.concatenate(probs_all) if probs_all else np.zeros((0, len(self.labels_names)), np.float32)
        full = gather_rows(rows, probs, self.n_val, self.info)
        # Unweighted BCE per known element, summed over ranks: comparable across runs and weights.
        total_known = all_mean(float(known), self.info) * self.info.world_size
        loss = all_mean(loss_sum, self.info) * self.info.world_size / max(total_known, 1.0)
        return full, loss

    def auroc_by_dataset(self, probs: np.ndarray) -> dict[str, float | None]:
        """Mean validation AUROC of each dataset's own validation part (None where undefined)."""
        out: dict[str, float | None] = {}
        for part in self.parts:
            rows = self.val_sources == part.spec
            auroc = per_class_auroc(self.val_targets[rows], probs[rows]) if rows.any() else np.array([np.nan])
            out[part.spec] = float(np.nanmean(auroc)) if np.isfinite(auroc).any() else None
        return out

    def run(self, resume: bool = False, overwrite: bool = False) -> Path | None:
        """Train, checkpointing each epoch. Refuses to replace a run unless `overwrite`; a run
        folder this call created is removed again if it fails before its first checkpoint."""
        check_out(self.out, resume, overwrite)
        self.setup()  # data and model first: a bad option fails before the folder exists
        created, self.checkpointed = False, False
        try:
            if self.info.is_main:
                created = make_out(self.out)
                if overwrite and not resume:
                    clear_run(self.out)
            if resume:
                self.load_checkpoint()
            if self.info.is_main:
                self._start_tracking(resume)
            bundle = self._epochs()
        except BaseException:
            if created and not self.checkpointed:
                remove_new_out(self.out)
            raise
        finally:
            if self.tracker is not None:
                self.tracker.close()
        shutdown(self.info)
        return bundle

    def _start_tracking(self, resume: bool) -> None:
        cfg = self.cfg
        if not resume:
            save_text(self.out / CONFIG, dump_yaml(run_record(cfg.to_dict(), [part.index for part in self.parts])))
        purge = self.start_epoch * self.steps_per_epoch + 1 if resume else None
        self.tracker = Tracker(
            self.out, {**cfg.to_dict(), "device": str(self.device)}, self.labels_names, cfg.tensorboard, purge
        )
        log.info(
            "training %s at %d px on %d images, validating on %d (%s, %d process(es))",
            cfg.model,
            self.size,
            self.n_train,
            self.n_val,
            self.device,
            self.info.world_size,
        )

    def _epochs(self) -> Path | None:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            train_loss, ips = self.train_epoch(epoch)
            probs, val_loss = self.predict_val()
            auroc = per_class_auroc(self.val_targets, probs)
            macro = mean_auroc(self.val_targets, probs)
            acc = elementwise_accuracy(self.val_targets, probs >= 0.5)
            by_dataset = self.auroc_by_dataset(probs)
            if self.scheduler is not None and cfg.schedule == "plateau":
                self.scheduler.step(val_loss)
            rec = EpochRecord(
                epoch + 1,
                train_loss,
                val_loss,
                macro if math.isfinite(macro) else None,
                acc,
                self.optimizer.param_groups[0]["lr"],
                time.perf_counter() - t0,
                ips,
                extra={"val_auroc_by_dataset": by_dataset} if len(self.parts) > 1 else {},
            )
            improved = val_loss < self.best_loss
            if improved:
                self.best_loss, self.best_epoch = val_loss, epoch
                if self.info.is_main:
                    from safetensors.torch import save_file

                    state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
                    save_atomically(self.out / BEST_WEIGHTS, functools.partial(save_file, state))
            row = dataclasses.asdict(rec)
            row["best"] = improved
            self.history.append(row)
            if self.info.is_main:
                # The whole log from the history, atomically: no torn line, and no row repeated
                # when a run that crashed between log and checkpoint is resumed.
                text = "".join(json.dumps(r) + "\n" for r in self.history)
                save_text(self.out / LOG_FILE, text)
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
                    f"val_auroc {macro:.4f}  val_acc {acc:.4f}  lr {rec.lr:.2e}  {ips:.1f} img/s"
                    + "".join(
                        f"  {k} {v:.4f}" if v is not None else f"  {k} undefined"
                        for k, v in (by_dataset.items() if len(self.parts) > 1 else ())
                    )
                    + ("  *best" if improved else ""),
                    flush=True,
                )
                self._track_epoch(row, auroc)
            self.save_checkpoint(epoch)
            barrier(self.info)
        return self.finish()

    def _track_epoch(self, row: dict[str, Any], auroc: np.ndarray) -> None:
        if self.tracker is None:
            return
        memory = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.on_gpu else None
        self.tracker.epoch(row, auroc, memory)
        self.tracker.write_files(self.history, self.best_epoch)

    def dataset_names(self) -> list[str]:
        return [dataset_label(spec) for spec in root_list(self.cfg.root)]

    def data_summary(self) -> dict[str, Any]:
        """What the bundle says about its training data (as before for one NIH root)."""
        if len(self.parts) == 1 and self.parts[0].index.dataset == "nih":
            summary = self.parts[0].index.summary()  # type: ignore[attr-defined]
            return {
                "dataset_root": self.dataset_names()[0],
                "labels_file": summary["labels_file"],
                "split": {
                    "train": "official train_val minus validation patients",
                    "validation": summary["validation"],
                    "test": "official test_list.txt (not used)",
                },
                "images": {s: summary["splits"][s]["images"] for s in ("train", "val")},
                "patients": {s: summary["splits"][s]["patients"] for s in ("train", "val")},
            }
        datasets = describe(self.parts)
        return {
            "datasets": datasets,
            "split": "each dataset's own train and validation split; validation is their union",
            "views": self.cfg.views or "frontal",
            "uncertain": self.cfg.uncertain,
            "images": {s: sum(d["images"][s] for d in datasets.values()) for s in ("train", "val")},
            "patients": {s: sum(d["patients"][s] for d in datasets.values()) for s in ("train", "val")},
        }

    def finish(self) -> Path | None:
        """Best weights -> validation probabilities -> thresholds -> bundle (rank 0 writes)."""
        from safetensors.torch import load_file

        barrier(self.info)
        best = load_file(str(self.out / BEST_WEIGHTS), device=str(self.device))
        self.model.load_state_dict(best)
        if self.info.is_main:
            log.info("validation pass with the best weights (epoch %d, %d images)", self.best_epoch + 1, self.n_val)
        probs, val_loss = self.predict_val()
        if not self.info.is_main:
            return None
        log.info("tuning the thresholds on the validation split")
        tuned = tune_thresholds(probs, self.val_targets, self.labels_names)
        from chestxray.evaluation.metrics import evaluate_predictions

        val_metrics = evaluate_predictions(
            self.val_targets, probs, tuned.thresholds, self.labels_names, groups=None, n_boot=0
        )
        val_metrics["loss"] = val_loss
        val_metrics["threshold_fallback"] = tuned.fallback
        if len(self.parts) > 1:
            val_metrics["by_dataset"] = {
                key: evaluate_predictions(
                    self.val_targets[self.val_sources == part.spec],
                    probs[self.val_sources == part.spec],
                    tuned.thresholds,
                    self.labels_names,
                    groups=None,
                    n_boot=0,
                )
                for key, part in zip(self.dataset_names(), self.parts)
            }
        meta = BundleMeta(
            architecture=self.cfg.model,
            labels=self.labels_names,
            preprocessing=self.model.preprocessing,
            thresholds=[float(t) for t in tuned.thresholds],
            name=self.cfg.name or f"{self.cfg.model}-" + "+".join(self.dataset_names()).replace(":", "-"),
            threshold_method=(
                "per-class F1-optimal on the validation split (exact search over distinct "
                f"scores); fallback {tuned.fallback} -> 0.5 (no validation positive)"
            ),
            training={
                **self.data_summary(),
                "best_epoch": self.best_epoch + 1,
                "epochs_run": len(self.history),
                "recipe": {k: v for k, v in self.cfg.to_dict().items() if k not in ("root", "out", "cache")},
                "history": self.history,
            },
            metrics={"validation": val_metrics},
        )
        from chestxray.evaluation.tune import fit_after_training  # calibrator, operating point, input check

        extra = fit_after_training(
            self.model,
            meta,
            probs,
            self.val_targets,
            self.train_batches,
            self.val_batches,
            self._prep,
            self.info.enabled,
        )
        log.info("writing %s", self.out / BUNDLE)
        with writing(self.out / BUNDLE):
            bundle = save_bundle(self.model, meta, self.out / BUNDLE, extra=extra)
        if self.tracker is not None:
            log.info("writing the run's curves and summary")
            self.tracker.roc_images(self.val_targets, probs, self.best_epoch + 1)
            self.tracker.write_files(self.history, self.best_epoch, final=val_metrics)
        return bundle


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path | None:
    return Trainer(cfg).run(resume=resume, overwrite=overwrite)
