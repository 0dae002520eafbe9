"""Training options from a file, recipes, and the `RUN/config.yaml` record of a run.

Precedence, lowest first: `TrainConfig` defaults (the seed recipe) < the chosen `--recipe` <
the `--config` file < flags given on the command line. A run's `config.yaml` holds the resolved
options under `options:`, so `chestxray train --config RUN/config.yaml --out RUN2` re-runs it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chestxray.errors import ChestXrayError

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
# Not options of a run: where it goes and what to do with an existing one.
NOT_OPTIONS = ("out", "config", "resume", "overwrite")
# A run folder's record, newest name first (config.json: runs made before config.yaml).
LEGACY_CONFIG_NAMES = ("config.yaml", "config.json")
# What a value in a config file may be, from TrainConfig's annotations.
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list[str]": (list,),
}


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise ChestXrayError("YAML config files need PyYAML: pip install pyyaml (or use a .json file)") from None
    return yaml


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML or JSON file holding a mapping; one-line errors naming the file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ChestXrayError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ChestXrayError(f"--config {path}: not a text file") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = _yaml().safe_load(text)  # JSON is YAML too, but JSON's errors are clearer
    except ChestXrayError:
        raise
    except Exception as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML: 0-based; json: lineno is 1-based
        line = mark.line + 1 if mark is not None else getattr(exc, "lineno", None)
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise ChestXrayError(f"--config {path}: not valid {kind}" + (f" (line {line})" if line else "")) from None
    if not isinstance(data, dict):
        raise ChestXrayError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def options_from_file(path: str | Path, fields: Mapping[str, str]) -> dict[str, Any]:
    """The options of a config file: a run's config.yaml (`options:`), an old run's config.json
    (flat), or a hand-written file (flat; `image-size` and `image_size` both accepted).
    `fields`: option name -> type annotation (TrainConfig's; passed in, as the loop imports this)."""
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in LEGACY_CONFIG_NAMES if (path / n).is_file()), path / LEGACY_CONFIG_NAMES[0])
    data = read_mapping(path)
    options = data.get("options", data) if isinstance(data.get("options"), dict) else data
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name in ("resume", "overwrite", "config"):
            continue  # actions of one invocation, not options of the run
        if name not in fields:
            raise ChestXrayError(f"--config {path}: unknown option {key!r}; known: {', '.join(sorted(fields))}")
        out[name] = _check_type(path, name, value, fields[name])
    return out


def _check_type(path: Path, name: str, value: Any, annotation: str) -> Any:
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    if "float" in kinds and isinstance(value, str):
        # PyYAML reads `1e-3` (no dot) as a string: YAML 1.1 floats need one.
        try:
            return float(value)
        except ValueError:
            pass
    allowed = tuple(t for k in kinds for t in _TYPES.get(k, ()))
    # bool is an int in Python, but `epochs: true` is a mistake, not 1 epoch.
    if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
        raise ChestXrayError(f"--config {path}: {name} must be {' or '.join(kinds)}, got {value!r}")
    return float(value) if "float" in kinds else value


def resolve_options(explicit: dict[str, Any], config_file: str | None, fields: Mapping[str, str]) -> dict[str, Any]:
    """Merge recipe, config file and explicit flags (see the module docstring)."""
    from_file = options_from_file(config_file, fields) if config_file else {}
    recipe = explicit.get("recipe", from_file.get("recipe", "seed"))
    if recipe not in RECIPES:
        raise ChestXrayError(f"unknown recipe {recipe!r}; choose {' or '.join(RECIPES)}")
    return {**RECIPES[recipe], **from_file, **explicit, "recipe": recipe}


def check_config(weights: str, freeze: str) -> None:
    """Refuse combinations that train to nothing without a word."""
    if weights == "none" and freeze in ("seed", "head"):
        frozen = "the stem and layer1" if freeze == "seed" else "everything but the head"
        raise ChestXrayError(
            f"--weights none with --freeze {freeze} keeps {frozen} at random values (it trains to "
            "chance level); use --recipe scratch (all layers, AdamW, one-cycle to 1e-3, strong "
            "augmentation) or at least --freeze all"
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        "sha256": {_relative(f, root): _sha256(f) for f in files},
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
    options = {k: v for k, v in resolved.items() if k not in NOT_OPTIONS}
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
    if (run / LEGACY_CONFIG_NAMES[0]).is_file():
        data = read_mapping(run / "config.yaml")
        return data if isinstance(data.get("options"), dict) else {"options": data}
    if (run / "config.json").is_file():
        return {"options": read_mapping(run / "config.json")}
    return None
