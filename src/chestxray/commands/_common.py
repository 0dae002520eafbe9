"""Options shared by several subcommands, defined once."""

from __future__ import annotations

import argparse
import re

from chestxray.errors import ChestXrayError

# The library parameters that library errors name (`device='cuda:3'`, `resume=True`); the
# flag of each is its name with dashes, unless FLAG_NAMES gives another.
_PARAMETER = re.compile(
    r"\b(allow_missing|allow_outside_root|backend|by|calibration|csv_columns|device|file|fmt|force|freeze|init|"
    r"input_check_split|int8|labels|models?|n|opset|out|overwrite|pos_weight|recipe|resume|shard|tensorboard|trust_pickle|views|"
    r"weights)=(True\b|'([^'\s]*)'|[^\s,;:()'`]*)"
)
FLAG_NAMES = {"fmt": "--format"}


def flag_message(exc: ChestXrayError) -> str:
    """The error as the command line says it: each library parameter named in it
    (`name=value`, `name=True`) shown as the flag that sets it (`--name value`, `--name`)."""

    def flag(m: re.Match[str]) -> str:
        name, value, quoted = m.group(1), m.group(2), m.group(3)
        text = FLAG_NAMES.get(name) or "--" + name.replace("_", "-")
        value = quoted if quoted is not None else ("" if value == "True" else value)
        return f"{text} {value}" if value else text

    return _PARAMETER.sub(flag, str(exc))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def require_modules(command: str, modules: dict[str, str], extra: str = "eval") -> None:
    """A one-line error naming the extra to install when a module `command` needs is absent
    (`modules`: import name -> distribution name)."""
    import importlib.util

    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # an import hook that refuses it, or a broken install
            return True

    absent = [dist for name, dist in modules.items() if missing(name)]
    if absent:
        raise ChestXrayError(
            f"{command} needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not installed: "
            f"pip install 'chestxray[{extra}]'"
        )


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def device_name(text: str) -> str:
    from chestxray.models.device import check_device_name

    try:
        return check_device_name(text)
    except ChestXrayError as exc:
        raise argparse.ArgumentTypeError(flag_message(exc)) from None


def device_help(default: str) -> str:
    """The --device help, naming the default once and next to its own choice."""
    if default == "auto":
        return "where the network runs: auto (the default: CUDA when available, else CPU), cpu, cuda or cuda:N"
    return f"where the network runs: {default} (the default), auto (CUDA when available, else CPU), cpu, cuda or cuda:N".replace(
        f"CPU), {default}, ", "CPU), "
    )


def add_device_arg(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    p.add_argument("--device", type=device_name, default=default, help=device_help(default))


def resolve_device_arg(device: str, backend: str = "torch") -> str:
    """The device a torch backend will use; the ONNX backend runs on onnxruntime's CPU provider."""
    if backend == "onnx":
        return "cpu"
    from chestxray.models.device import resolve_device

    return resolve_device(device)


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that opens a dataset root."""
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of train_val patients held out for validation (default 0.1)",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation carve (default 0)")
    p.add_argument(
        "--allow-missing", action="store_true", help="use the images that are present when some listed ones are missing"
    )
    p.add_argument(
        "--uncertain",
        choices=("ignore", "ones", "zeros"),
        default="ignore",
        help="CheXpert/MIMIC uncertain (-1) labels: ignore (masked, default), ones or zeros",
    )
    p.add_argument(
        "--views",
        default=None,
        help="views to use: 'frontal' (default except for info), 'all', or a list such as PA,AP",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="patients held out for test where a dataset has no official split (default 0.2)",
    )
    p.add_argument("--csv-spec", default=None, metavar="FILE", help="JSON/YAML column spec for csv: roots")
    p.add_argument(
        "--csv-columns",
        default=None,
        metavar="KEY=COL,...",
        help="csv: column names as flags: path, labels ('|' findings), findings (a;b), patient, study, split, "
        "view, sex, age, separator, file",
    )
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="csv: allow image and label paths outside the dataset's folder (../, absolute paths)",
    )
    p.add_argument(
        "--vindr-rule",
        choices=("any", "majority"),
        default="any",
        help="VinDr image label from its three radiologists: any (default) or majority",
    )


def dataset_options(args: argparse.Namespace, *, require_images: bool = True, views: str | None = "frontal"):
    """The DatasetOptions of a command's dataset flags (`views`: the command's default)."""
    from chestxray.data.common import DatasetOptions

    return DatasetOptions(
        val_fraction=args.val_fraction,
        seed=args.split_seed,
        test_fraction=args.test_fraction,
        allow_missing=args.allow_missing,
        require_images=require_images,
        uncertain=args.uncertain,
        vindr_rule=args.vindr_rule,
        csv_spec=args.csv_spec,
        csv_columns=args.csv_columns,
        allow_outside_root=args.allow_outside_root,
        views=args.views if args.views is not None else views,
    )


ROOT_HELP = (
    "dataset root: PATH (NIH ChestX-ray14) or NAME:PATH with NAME one of nih, chexpert, mimic, padchest, vindr, csv"
)


def add_model_args(p: argparse.ArgumentParser, backends: bool = True) -> None:
    """--model, --device (and --backend): shared by predict, evaluate, report and serve."""
    from chestxray.inference.predict import BACKENDS

    p.add_argument(
        "--model",
        metavar="MODEL",
        default=None,
        help="model bundle (.safetensors or a training run folder) or exported .onnx file; default: the bundled model",
    )
    if backends:
        p.add_argument(
            "--backend",
            choices=BACKENDS,
            default="auto",
            help="auto (default: from the model file; ONNX when torch is not installed), torch, or onnx (onnxruntime)",
        )
    add_device_arg(p)
