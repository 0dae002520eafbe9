"""`chestxray import xrv NAME`: torchxrayvision's published weights -> a safe bundle, once.

The one place in the package that may read a pickle. Their ResNet-50 file is a plain state
dict and loads with `torch.load(weights_only=True)`. Their DenseNet files are whole pickled
models referencing `torchxrayvision.models` classes; they are read only when the user passes
`--trust-pickle`, through `RestrictedUnpickler`, which resolves exactly the class and function
names such a file needs (module classes become inert `StandIn` records, tensors are rebuilt
by torch's own functions) and refuses every other global. The bundle written afterwards is
safetensors + JSON, so nothing unpickles the file again.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import threading
import types
import urllib.request
import warnings
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chestxray.errors import BundleError, ChestXrayError, WeightsUnavailableError
from chestxray.io import file_sha256
from chestxray.models.bundle import BUNDLE_FILENAME, BundleMeta, save_bundle
from chestxray.models.xrv_weights import LICENCE, XRV_WEIGHTS, XrvWeights, kept_outputs, xrv_preprocessing

if TYPE_CHECKING:  # torch is imported once the file is here: offline, the download fails first, fast
    import torch

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0  # seconds to get a first answer from the server; offline fails this fast
READ_TIMEOUT = 60.0
PICKLE_WARNING = (
    "warning: --trust-pickle: reading a pickled torchxrayvision model through a restricted unpickler "
    "(only its module and tensor classes are allowed); do this only with a file from their release page"
)


class XrvImportError(BundleError):
    """The weights file cannot be turned into a bundle."""


def xrv_weights(name: str) -> XrvWeights:
    try:
        return XRV_WEIGHTS[name]
    except KeyError:
        raise ChestXrayError(f"unknown torchxrayvision weights {name!r}; known: {', '.join(XRV_WEIGHTS)}") from None


# ---- download ------------------------------------------------------------------------------
def download(url: str, dest: Path, *, connect_timeout: float = CONNECT_TIMEOUT) -> None:
    """Fetch `url` into `dest`. The request runs in a worker thread so that a hanging DNS
    lookup (which no socket timeout covers) cannot hold the command: without an answer within
    `connect_timeout` seconds it fails with an error that names --file."""
    answered = threading.Event()
    done = threading.Event()
    outcome: dict[str, BaseException] = {}

    def fetch() -> None:
        try:
            with urllib.request.urlopen(url, timeout=READ_TIMEOUT) as resp:
                answered.set()
                with open(dest, "wb") as fh:
                    while chunk := resp.read(1 << 20):
                        fh.write(chunk)
        except BaseException as exc:  # reported to the caller's thread
            outcome["error"] = exc
        finally:
            answered.set()
            done.set()

    threading.Thread(target=fetch, daemon=True, name="xrv-download").start()
    if not answered.wait(connect_timeout + 0.5):
        outcome.setdefault("error", TimeoutError(f"no answer within {connect_timeout:g} s"))
    else:
        done.wait()
    if "error" in outcome:
        exc = outcome["error"]
        raise WeightsUnavailableError(
            f"cannot download {url} ({type(exc).__name__}: {exc}). Without a network, download that file "
            "elsewhere and pass it with file=PATH"
        )


# ---- restricted unpickling -----------------------------------------------------------------
class StandIn:
    """An inert record of a pickled nn.Module: its attribute dict, nothing callable."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.qualname}: unexpected pickled state {type(state).__name__}")
        self.__dict__.update(state)


def _stand_in(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (StandIn,), {"qualname": qualname})


def _no_backend() -> None:
    """Old torch (< 1.0) pickled each module's THNN backend handle; it carries no data."""
    return None


_MODULE_CLASSES = (
    "torchxrayvision.models.DenseNet",
    "torchxrayvision.models._DenseBlock",
    "torchxrayvision.models._DenseLayer",
    "torchxrayvision.models._Transition",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.container.Sequential",
)


@lru_cache(maxsize=1)
def allowed_globals() -> dict[tuple[str, str], Any]:
    """Every global a torchxrayvision DenseNet file may name, and what it resolves to."""
    import torch._utils

    return {
        **{(q.rpartition(".")[0], q.rpartition(".")[2]): _stand_in(q) for q in _MODULE_CLASSES},
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("__builtin__", "set"): set,  # protocol 2 writes Python 2's module name
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _no_backend,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `allowed_globals()`; anything else is refused with its name."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return allowed_globals()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: not part of a torchxrayvision DenseNet file"
            ) from None


def _restricted_pickle_module() -> types.ModuleType:
    """A stand-in for the `pickle` module that torch.load uses: its Unpickler (torch subclasses
    it to add storages) and its load (used for the header of legacy files) are restricted."""
    mod = types.ModuleType("chestxray_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return mod


def state_dict_of(record: Any, prefix: str = "") -> dict[str, "torch.Tensor"]:
    """The persistent parameters and buffers of a StandIn module tree, keyed as state_dict() would."""
    import torch

    if not isinstance(record, StandIn):
        raise XrvImportError(f"{prefix or 'the file'}: expected a pickled module, found {type(record).__name__}")
    out: dict[str, "torch.Tensor"] = {}
    skip = set(getattr(record, "_non_persistent_buffers_set", ()) or ())
    for kind in ("_parameters", "_buffers"):
        for key, value in (getattr(record, kind, None) or {}).items():
            if value is None or key in skip:
                continue
            if not isinstance(value, torch.Tensor):
                raise XrvImportError(f"{prefix}{key}: not a tensor ({type(value).__name__})")
            out[prefix + key] = value.detach()
    for key, child in (getattr(record, "_modules", None) or {}).items():
        if child is not None:
            out.update(state_dict_of(child, f"{prefix}{key}."))
    return out


def read_weights_file(path: Path, weights: XrvWeights, trust_pickle: bool, warn: Callable[[str], None]) -> dict:
    """The state dict in `path`: `weights_only=True` first; a whole pickled model only with
    `trust_pickle`, through RestrictedUnpickler."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise XrvImportError(
                f"{path}: a pickled whole model (torchxrayvision saves its DenseNet weights this way), "
                "which torch.load(weights_only=True) refuses. To read it through a restricted unpickler that "
                "allows only torchxrayvision's module classes and tensors, pass trust_pickle=True"
            ) from None
        log.debug("weights_only load refused (%s); restricted unpickler", str(exc)[:200])
        warn(PICKLE_WARNING)
        try:
            with warnings.catch_warnings():  # legacy files: "Couldn't retrieve source code for container"
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(
                    path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module()
                )
        except pickle.UnpicklingError as inner:
            raise XrvImportError(f"{path}: {inner}") from None
        except Exception as inner:  # a damaged or foreign file fails in many ways
            raise XrvImportError(f"{path}: not a readable torch file ({type(inner).__name__}: {inner})") from None
        return state_dict_of(obj)
    except Exception as exc:  # truncated downloads, HTML error pages, ...
        raise XrvImportError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise XrvImportError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return obj


# ---- conversion ----------------------------------------------------------------------------
def convert(state: dict[str, "torch.Tensor"], weights: XrvWeights, source: str) -> Any:
    """Their state dict -> our network (ChestClassifier) with only the kept output rows."""
    import torch

    from chestxray.models.registry import create_model, get_spec

    kept = kept_outputs(weights)
    spec = get_spec(weights.architecture)
    model = create_model(
        weights.architecture, num_classes=len(kept), weights="none", freeze="all", image_size=weights.resolution
    )
    backbone = model.backbone
    head = spec.head + "."
    state = {k: v for k, v in state.items() if k != "op_threshs"}
    rows = torch.tensor([i for i, _, _ in kept])
    n_out = len(weights.labels)
    for key in (head + "weight", head + "bias"):
        if key not in state or state[key].shape[0] != n_out:
            shape = tuple(state[key].shape) if key in state else None
            raise XrvImportError(f"{source}: {key} has shape {shape}; {weights.name} has {n_out} outputs")
        state[key] = state[key].index_select(0, rows)
    expected = backbone.state_dict()
    for key, value in expected.items():
        # BatchNorm's step counter arrived in torch 0.4.1; older pickles lack it (it is unused in eval).
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        raise XrvImportError(
            f"{source}: not {weights.name} weights: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(bad)} of another shape (e.g. {bad[:2]})"
        )
    backbone.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def bundle_path(out: str | os.PathLike) -> Path:
    """OUT.safetensors, or OUT/model.safetensors for a folder."""
    p = Path(out)
    return p if p.suffix == ".safetensors" else p / BUNDLE_FILENAME


def import_xrv(
    name: str,
    out: str | os.PathLike,
    *,
    file: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    say: Callable[[str], None] = lambda s: None,
) -> tuple[Path, BundleMeta]:
    """Convert torchxrayvision weights `name` (downloaded, or `file`) into a bundle at `out`.
    Written atomically: on any error no bundle (and no partial file) is left at `out`."""
    weights = xrv_weights(name)
    target = bundle_path(out)
    with tempfile.TemporaryDirectory(prefix="chestxray-xrv-") as tmp:
        if file is not None:
            path = Path(file)
            if not path.is_file():
                raise WeightsUnavailableError(f"file={str(path)!r}: no such file")
            origin = f"file {path.name} given with --file"
        else:
            path = Path(tmp) / weights.filename
            say(f"downloading {weights.url}")
            download(weights.url, path)
            origin = "downloaded"
        sha = file_sha256(path)
        say(f"{path.name}: SHA-256 {sha}")
        state = read_weights_file(path, weights, trust_pickle, say)
        model = convert(state, weights, str(path))
    kept = kept_outputs(weights)
    dropped = [lab or f"<empty slot {i}>" for i, lab in enumerate(weights.labels) if i not in {k for k, _, _ in kept}]
    meta = BundleMeta(
        architecture=weights.architecture,
        labels=[lab for _, lab, _ in kept],
        preprocessing=xrv_preprocessing(weights.resolution),
        thresholds=[float(t) for _, _, t in kept],
        name=f"xrv-{weights.name}",
        threshold_method=(
            "torchxrayvision's published operating thresholds (op_threshs) for these weights; positive when "
            "the plain sigmoid probability reaches it, which is where their op_norm output crosses 0.5"
        ),
        training={
            "source": {
                "library": "torchxrayvision",
                "weights": weights.name,
                "url": weights.url,
                "sha256": sha,
                "file": path.name,
                "obtained": origin,
                "licence": LICENCE,
                "description": weights.description,
                "outputs_dropped": dropped,
                "output_index": {lab: i for i, lab, _ in kept},
            }
        },
    )
    save_bundle(model, meta, target)
    return target, meta
