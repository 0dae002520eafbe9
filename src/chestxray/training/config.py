"""Training options from a file, recipes, and the `RUN/config.yaml` record of a run.

Precedence, lowest first: `TrainConfig` defaults (the seed recipe) < the chosen `--recipe` <
the `--config` file < flags given on the command line. A run's `config.yaml` holds the resolved
options under `options:`, so `chestxray train --config RUN/config.yaml --out RUN2` re-runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import reprlib
import subprocess
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from chestxray.errors import ChestXrayError
from chestxray.io import file_sha256
from chestxray.training.rundir import LEGACY_CONFIG_NAMES, run_config_file

__all__ = ["LEGACY_CONFIG_NAMES", "NOT_OPTIONS", "RECIPES", "TrainConfig", "resolve_options", "run_config_file"]

Recipe = Literal["seed", "scratch"]


@dataclass
class TrainConfig:
    """Defaults are the seed recipe: ResNet-50, layer2-4 + head, Adam 1e-5, plateau, 5 epochs.
    `RECIPES` holds the others (`--recipe scratch`). Every value is checked on construction."""

    root: str | list[str]  # one dataset root or several (NAME:PATH; a bare path is NIH)
    out: str
    model: str = "resnet50"
    weights: str = "imagenet"  # imagenet, none or a state-dict FILE
    freeze: Literal["seed", "all", "head"] = "seed"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    schedule: Literal["plateau", "onecycle", "cosine", "none"] = "plateau"
    plateau_factor: float = 0.1
    plateau_patience: int = 1
    image_size: int | None = None  # None: the model's own input size (224 for torchvision, timm's config)
    augment: Literal["none", "seed", "strong"] = "none"
    pos_weight: Literal["none", "balanced"] = "none"
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    cache: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    allow_missing: bool = False
    allow_outside_root: bool = False  # csv: image and label paths outside the dataset root
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    compile: bool = False
    channels_last: bool = True  # on GPU
    max_steps: int | None = None  # per epoch, for smoke tests
    name: str | None = None
    labels: str | None = None  # comma-separated findings; default: every finding the data labels
    views: str | None = None  # default frontal
    uncertain: Literal["ignore", "ones", "zeros"] = "ignore"  # CheXpert/MIMIC -1 labels
    test_fraction: float = 0.2
    csv_spec: str | None = None
    csv_columns: str | None = None
    vindr_rule: Literal["any", "majority"] = "any"
    loader: Literal["auto", "ram", "memmap"] = "auto"  # memmap: the split read from the cache per batch
    recipe: Recipe = "seed"  # recorded; the options it implies are resolved by `resolve_options`
    tensorboard: bool | None = None  # None: on when the tensorboard package is installed
    log_every: int = 50  # progress line every N steps when stderr is not a terminal (0: never)
    init: str | None = None  # a bundle to start from (its architecture and preprocessing)

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            check_option(name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# `--recipe scratch`: the README's and the model card's from-scratch options (random init, every
# layer trained, AdamW + one-cycle to 1e-3, strong augmentation). `seed` is TrainConfig's defaults.
RECIPES: dict[str, dict[str, Any]] = {
    "seed": {},
    "scratch": {
        "weights": "none",
        "freeze": "all",
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "onecycle",
        "epochs": 30,
        "augment": "strong",
    },
}
# Actions of one invocation, not options of a run: never read from, or recorded in, a config.
NOT_OPTIONS = ("config", "resume", "overwrite")
# A config file is a page of options; anything larger is not one (and is not read into memory).
MAX_CONFIG_BYTES = 1 << 20
# Ranges of numeric options: (test, what the value must be).
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "plateau_factor": (lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
    "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "test_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    **{k: (lambda v: v >= 1, "at least 1") for k in ("epochs", "batch_size", "max_steps", "image_size")},
    **{k: (lambda v: v >= 0, "0 or more") for k in ("plateau_patience", "workers", "log_every", "seed", "split_seed")},
}
# What an error shows of a bad value: bounded, however large or deep the value is.
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def short(value: Any) -> str:
    return _SHORT.repr(value)


@functools.cache
def option_hints() -> dict[str, Any]:
    """Option name -> resolved type of TrainConfig's field."""
    return typing.get_type_hints(TrainConfig)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return "a list of strings"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(value fits hint, the value as stored)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, out = _coerce(value, arm)
            if ok:
                return True, out
        return False, value
    if origin is Literal:
        return value in typing.get_args(hint) and isinstance(value, str), value
    if origin is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value), value
    if hint is type(None):
        return value is None, value
    if isinstance(value, bool):  # bool is an int in Python, but `epochs: true` is a mistake
        return hint is bool, value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string: YAML 1.1 floats need one
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    return isinstance(value, hint), value


def check_option(name: str, value: Any, where: str | None = None) -> Any:
    """The value of option `name` as stored; a one-line error naming the key (and `where`)
    for a value of the wrong type or out of range."""
    prefix = f"{where}: " if where else ""
    hints = option_hints()
    if name not in hints:
        raise ChestXrayError(f"{prefix}unknown option {short(name)}; known: {', '.join(sorted(hints))}")
    ok, out = _coerce(value, hints[name])
    if not ok:
        raise ChestXrayError(f"{prefix}{name} must be {_describe(hints[name])}, got {short(value)}")
    rule = _RANGES.get(name)
    if rule is not None and out is not None and not rule[0](out):
        raise ChestXrayError(f"{prefix}{name} must be {rule[1]}, got {short(value)}")
    return out


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise ChestXrayError("YAML config files need PyYAML: pip install pyyaml (or use a .json file)") from None
    return yaml


def read_mapping(path: Path, where: str | None = None) -> dict[str, Any]:
    """A YAML or JSON file holding a mapping; one-line errors naming the file (as `where`)."""
    where = where or f"--config {path}"
    from chestxray.io import load_yaml

    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ChestXrayError(f"{where}: {size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ChestXrayError(f"{where}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ChestXrayError(f"{where}: not a text file") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            _yaml()
            data = load_yaml(text)  # JSON is YAML too, but JSON's errors are clearer
    except ChestXrayError:
        raise
    except ValueError as exc:  # load_yaml: anchors and aliases refused
        if path.suffix.lower() != ".json":
            raise ChestXrayError(f"{where}: {exc}") from None
        line = getattr(exc, "lineno", None)
        raise ChestXrayError(f"{where}: not valid JSON" + (f" (line {line})" if line else "")) from None
    except Exception as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML: 0-based
        line = mark.line + 1 if mark is not None else None
        raise ChestXrayError(f"{where}: not valid YAML" + (f" (line {line})" if line else "")) from None
    if not isinstance(data, dict):
        raise ChestXrayError(f"{where}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def _against(folder: Path, spec: str) -> str:
    """A root (`NAME:PATH` or a bare path) or folder from a file, relative to the file's folder."""
    from chestxray.data.datasets import parse_root

    name, path = parse_root(spec)
    if path.is_absolute():
        return spec
    resolved = str((folder / path).resolve())
    return resolved if spec == str(path) else f"{name}:{resolved}"


def options_from_file(path: str | Path) -> dict[str, Any]:
    """The options of a config file: a run's config.yaml (`options:`), an old run's config.json
    (flat), or a hand-written file (flat; `image-size` and `image_size` both accepted). Relative
    `root`, `out` and `cache` are taken against the file's folder, not the working directory."""
    path = Path(path)
    if path.is_dir():
        path = run_config_file(path) or path / LEGACY_CONFIG_NAMES[0]
    data = read_mapping(path)
    options = data.get("options", data) if isinstance(data.get("options"), dict) else data
    out: dict[str, Any] = {}
    where = f"--config {path}"
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name in NOT_OPTIONS:
            continue
        out[name] = check_option(name, value, where)
    folder = path.resolve().parent
    if isinstance(out.get("root"), str):
        out["root"] = _against(folder, out["root"])
    elif isinstance(out.get("root"), list):
        out["root"] = [_against(folder, r) for r in out["root"]]
    for key in ("out", "cache"):
        if isinstance(out.get(key), str):
            out[key] = str(folder / out[key]) if not Path(out[key]).is_absolute() else out[key]
    return out


def resolve_options(explicit: dict[str, Any], config_file: str | None) -> dict[str, Any]:
    """Merge recipe, config file and explicit flags (see the module docstring); every value is
    checked here, so an error names the flag or the file it came from."""
    from_file = options_from_file(config_file) if config_file else {}
    given = {k: check_option(k, v, "--" + k.replace("_", "-") if k != "root" else "ROOT") for k, v in explicit.items()}
    recipe = given.get("recipe", from_file.get("recipe", "seed"))
    return {**RECIPES[recipe], **from_file, **given, "recipe": recipe}


def check_config(weights: str, freeze: str) -> None:
    """Refuse combinations that train to nothing without a word."""
    if weights == "none" and freeze in ("seed", "head"):
        frozen = "the stem and layer1" if freeze == "seed" else "everything but the head"
        raise ChestXrayError(
            f"weights='none' with freeze={freeze!r} keeps {frozen} at random values (it trains to "
            "chance level); use recipe='scratch' (all layers, AdamW, one-cycle to 1e-3, strong "
            "augmentation) or at least freeze='all'"
        )


# ---- the record of a run ---------------------------------------------------------------------
def _git_commit() -> str | None:
    """The commit of the source tree this package runs from, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    commit = proc.stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def dataset_record(index: Any) -> dict[str, Any]:
    """Root, file counts and hashes of the label and split files: enough to tell the data changed."""
    root = Path(index.root)
    labels_file = getattr(index, "labels_file", None)
    files = [Path(labels_file)] if labels_file else []
    files += [root / n for n in ("train_val_list.txt", "test_list.txt") if (root / n).is_file()]
    return {
        "dataset": getattr(index, "dataset", "nih"),
        "root": str(root.resolve()),
        "rows": len(index.frame),
        "images_found": int(index.frame["path"].notna().sum()),
        "splits": {s: int(len(index.split_positions(s))) for s in ("train", "val", "test")},
        "sha256": {_relative(f, root): file_sha256(f) for f in files},
    }


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def environment_record() -> dict[str, Any]:
    import numpy
    import torch

    from chestxray import __version__

    return {
        "chestxray": __version__,
        "torch": str(torch.__version__),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def run_record(resolved: dict[str, Any], indexes: list[Any]) -> dict[str, Any]:
    options = {k: v for k, v in resolved.items() if k != "out"}  # where it went is not how it ran
    # Absolute paths, so that the record re-runs from any working directory.
    if options.get("cache"):
        options["cache"] = str(Path(options["cache"]).resolve())
    options["root"] = (
        [_absolute_root(r) for r in options["root"]]
        if isinstance(options["root"], list)
        else (_absolute_root(options["root"]))
    )
    return {"options": options, "environment": environment_record(), "data": [dataset_record(i) for i in indexes]}


def _absolute_root(spec: str) -> str:
    """`NAME:PATH` or a bare path, with the path made absolute."""
    from chestxray.data.datasets import parse_root

    name, path = parse_root(spec)
    absolute = str(Path(path).resolve())
    return absolute if spec == str(path) else f"{name}:{absolute}"


def dump_yaml(record: dict[str, Any]) -> str:
    header = "# chestxray training run; `chestxray train --config THIS_FILE --out NEW_RUN` re-runs it\n"
    return header + _yaml().safe_dump(record, sort_keys=False, default_flow_style=False)


def read_run_config(run: Path) -> dict[str, Any] | None:
    """A run folder's record: config.yaml, or an old run's flat config.json (as `options`)."""
    path = run_config_file(run)
    if path is None:
        return None
    data = read_mapping(path, str(path))
    return data if isinstance(data.get("options"), dict) else {"options": data}
