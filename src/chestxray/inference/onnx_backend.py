"""Torch-free inference on an ONNX file written by `chestxray export`.

Needs only numpy, pillow and onnxruntime (`pip install chestxray[infer]`). The file
carries everything the Analyzer needs in its metadata (labels, thresholds,
preprocessing, name: the bundle's JSON under the key "chestxray"), and its graph takes
the eval preset's output, gray float32 (N, 1, S, S) in [0, 1], and returns
probabilities (the sigmoid is part of the graph). Grad-CAM: files exported from a network
whose head is one linear layer on the pooled last block (ResNets) also output that block's
class activation maps, which equal Grad-CAM there (see export/onnx.py); inference/explain.py
turns them into overlays with numpy.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.errors import BundleError, ChestXrayError
from chestxray.inference.backend import Backend
from chestxray.models.bundle import META_KEY, BundleMeta

ONNX_FORMAT = "chestxray-onnx"
ONNX_FORMAT_VERSION = 1  # what `chestxray export` writes
RETUNED_FORMAT_VERSION = 2  # a file re-tuned by `chestxray tune` (GRAPH_CALIBRATION): older readers refuse it
# A file re-tuned by `chestxray tune` keeps its graph (and the calibrator inside it) and records
# that calibrator under this key; the metadata's `calibration` is the one to apply, so the
# backend maps the graph's output through "metadata calibrator after the graph's one undone".
GRAPH_CALIBRATION = "graph_calibration"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
FEATURES_NAME = "features"  # optional output: the pooled feature vector (N, D)
SCORE_NAME = "input_score"  # optional output: the input check's score
CAM_NAME = "cam"  # optional output: (N, C, h, w) class activation maps of the last block
DEFAULT_ONNX_NAME = "default.onnx"
INSTALL_HINT = "pip install 'chestxray[infer]' (onnxruntime, no torch needed)"


@dataclass(frozen=True)
class OnnxInfo:
    """What `chestxray export` wrote into an ONNX file's metadata."""

    meta: BundleMeta
    props: dict[str, str]

    @property
    def quantization(self) -> str:
        return self.props.get("quantization", "none")

    @property
    def parity(self) -> dict[str, Any]:
        try:
            return json.loads(self.props.get("parity", "{}"))
        except json.JSONDecodeError:
            return {}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ChestXrayError(f"the onnx backend needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def default_onnx_path() -> Path:
    """The ONNX model shipped inside the package, if this install has one."""
    from importlib.resources import files

    path = Path(str(files("chestxray.weights").joinpath(DEFAULT_ONNX_NAME)))
    if not path.is_file():
        raise BundleError(
            "this install ships no ONNX model; pass model=MODEL.onnx. Make one from a bundle with "
            "`chestxray export` (export.onnx.export_bundle; needs chestxray[torch,export])"
        )
    return path


def resolve_onnx_path(path: str | os.PathLike | None) -> Path:
    """An existing .onnx file, or a BundleError that says what was given instead."""
    if path is None:
        return default_onnx_path()
    p = Path(path)
    if p.is_dir():
        candidates = sorted(p.glob("*.onnx"))
        if len(candidates) != 1:
            raise BundleError(f"{p}: the onnx backend needs an .onnx file; this folder holds {len(candidates)} of them")
        p = candidates[0]
    if not p.is_file():
        raise BundleError(f"{p}: no such ONNX file")
    if p.suffix == ".safetensors":
        raise BundleError(
            f"{p}: this is a PyTorch bundle, the onnx backend needs an ONNX file; convert it with "
            "`chestxray export` (export.onnx.export_bundle) or use backend='torch'"
        )
    return p


def ort_session(model: Path | bytes, threads: int | None = None, providers: list[str] | None = None) -> Any:
    """The one onnxruntime session set-up (inference, the export check, int8 checks): a file
    or serialized bytes; BundleError naming the source when onnxruntime cannot load it."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3  # errors only; ORT warns about unused initializers otherwise
    source = model if isinstance(model, bytes) else str(model)
    what = "the serialized graph" if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise BundleError(
            f"{what}: onnxruntime cannot load this file ({type(exc).__name__}: {str(exc)[:300]}; "
            f"onnxruntime {ort.__version__})"
        ) from None


def info_from_props(props: dict[str, str], source: str) -> OnnxInfo:
    if META_KEY not in props:
        raise BundleError(
            f"{source}: ONNX file without chestxray metadata (not written by `chestxray export`); "
            "the labels, thresholds and preprocessing are unknown"
        )
    fmt = props.get("format", ONNX_FORMAT)
    if fmt != ONNX_FORMAT:
        raise BundleError(f"{source}: metadata 'format' is {fmt!r}, expected {ONNX_FORMAT!r}")
    version = props.get("format_version", str(ONNX_FORMAT_VERSION))
    if not version.isdigit() or int(version) > RETUNED_FORMAT_VERSION:
        raise BundleError(f"{source}: chestxray ONNX format {version} is newer than this package reads")
    if props.get("output", OUTPUT_NAME + ":").split(":")[0] != OUTPUT_NAME:
        raise BundleError(f"{source}: the graph does not output probabilities ({props.get('output')!r})")
    info = OnnxInfo(BundleMeta.from_json(props[META_KEY], source), dict(props))
    post_calibration(info, source)  # a malformed re-tuning record fails on loading, naming the file
    return info


def post_calibration(info: OnnxInfo, source: str) -> Any:
    """The affine logit map applied to the graph's probabilities of a re-tuned file, or None:
    the metadata's calibrator composed with the inverse of the graph's (both are
    p = sigmoid(a * logit + b) per finding, so the result is one such map)."""
    from chestxray.inference.calibration import Calibration

    if GRAPH_CALIBRATION not in info.props:
        return None
    labels = info.meta.labels
    try:
        graph = Calibration.from_dict(json.loads(info.props[GRAPH_CALIBRATION]), labels, source)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{source}: metadata {GRAPH_CALIBRATION!r} is not JSON ({exc})") from None
    want = (
        Calibration.from_dict(info.meta.calibration, labels, source)
        if info.meta.calibration
        else Calibration.identity(labels)
    )
    a = want.a / graph.a
    return Calibration("retuned", list(labels), a, want.b - a * graph.b)


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def with_onnx_props(path: Path, props: dict[str, str]) -> bytes:
    """The bytes of the ONNX file `path` with its metadata_props replaced by `props`; the graph
    and every other field are copied as they are. Hand-written (a top-level protobuf scan, as
    `read_onnx_props`) so that re-tuning needs neither torch nor the onnx package."""
    data = Path(path).read_bytes()
    import io

    f, kept = io.BytesIO(data), bytearray()
    try:
        while f.tell() < len(data):
            start = f.tell()
            tag = _varint(f)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _varint(f)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, 1)
            elif wire == 2:
                f.seek(_varint(f), 1)
            else:
                raise ValueError(f"wire type {wire}")
            if f.tell() > len(data):
                raise EOFError
            if field != 14:  # ModelProto.metadata_props
                kept += data[start : f.tell()]
    except (EOFError, ValueError) as exc:
        raise BundleError(f"{path}: not an ONNX protobuf this package can rewrite ({exc})") from None
    for key, value in props.items():
        kept += _field(14, _field(1, key.encode("utf-8")) + _field(2, value.encode("utf-8")))
    return bytes(kept)


def read_onnx_info(path: str | os.PathLike) -> OnnxInfo:
    """The chestxray metadata of an ONNX file (read with onnxruntime; no onnx package needed)."""
    p = resolve_onnx_path(path)
    session = ort_session(p, threads=1)
    return info_from_props(dict(session.get_modelmeta().custom_metadata_map), str(p))


def _varint(f: Any) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def _entry(data: bytes) -> tuple[str, str]:
    """A StringStringEntryProto: key (field 1) and value (field 2)."""
    import io

    f = io.BytesIO(data)
    out = {1: "", 2: ""}
    while f.tell() < len(data):
        tag = _varint(f)
        if tag & 7 != 2:
            raise ValueError("unexpected wire type")
        out[tag >> 3] = f.read(_varint(f)).decode("utf-8")
    return out[1], out[2]


def read_onnx_props(path: Path) -> dict[str, str] | None:
    """The metadata_props of an ONNX file, read from its protobuf without parsing the graph
    (far quicker than importing onnxruntime and building a session), so bulk predict's
    decoders can start while the session loads. Hand-written because neither onnxruntime nor
    the onnx package reads the metadata alone. None when the file does not scan as expected;
    the session then reads it."""
    props: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while f.tell() < size:
                tag = _varint(f)
                field, wire = tag >> 3, tag & 7
                if wire == 0:
                    _varint(f)
                elif wire == 1:
                    f.seek(8, 1)
                elif wire == 5:
                    f.seek(4, 1)
                elif wire == 2:
                    n = _varint(f)
                    if field == 14:  # ModelProto.metadata_props
                        key, value = _entry(f.read(n))
                        props[key] = value
                    else:
                        f.seek(n, 1)
                else:
                    return None
            if f.tell() != size:
                return None
    except (OSError, EOFError, ValueError):
        return None
    return props


class LoadingOnnxBackend(Backend):
    """An `OnnxBackend` whose session is built later, with its metadata already read: what
    needs the session (`run`, `features`, `loaded().has_score`) waits for it; name, metadata,
    the workers' recipe do not. `start()` builds it in a background thread (bulk predict, while
    the decoders start); it is never built when the pipeline's workers infer and nothing fails."""

    name = "onnx"
    concurrent_runs = True  # as OnnxBackend

    def __init__(self, path: Path, info: OnnxInfo, threads: int | None = None) -> None:
        import threading

        self.path, self.info, self.threads = path, info, threads
        self.quantization = info.quantization
        self._backend: OnnxBackend | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import threading

        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="chestxray-onnx-load", daemon=True)
                self._thread.start()

    def _load(self) -> None:
        try:
            self._backend = OnnxBackend(self.path, threads=self.threads)
        except BaseException as exc:  # raised again to the caller of `loaded`
            self._error = exc

    def settle(self) -> None:
        """Wait for a build that `start` began: a process must not exit while onnxruntime
        builds a session in another thread (it aborts, exit status 134)."""
        if self._thread is not None:
            self._thread.join()

    def loaded(self) -> "OnnxBackend":
        self.start()
        self.settle()
        if self._error is not None:
            raise self._error
        assert self._backend is not None
        return self._backend

    def worker_recipe(self) -> "functools.partial[OnnxBackend]":
        """As `OnnxBackend.worker_recipe` (CPU), without building this process's session."""
        return functools.partial(OnnxBackend, str(self.path), threads=1)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.loaded().run(batch)

    def features(self, batch: np.ndarray) -> np.ndarray:
        return self.loaded().features(batch)

    @property
    def has_cam(self) -> bool:  # type: ignore[override]  # read from the loaded session
        return self.loaded().has_cam

    def run_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.loaded().run_cam(batch)


def loading_onnx_backend(path: str | os.PathLike | None, threads: int | None = None) -> "LoadingOnnxBackend | None":
    """`LoadingOnnxBackend` of a file whose metadata scans; None: load it the usual way."""
    p = resolve_onnx_path(path)
    props = read_onnx_props(p)
    if props is None or META_KEY not in props:
        return None
    return LoadingOnnxBackend(p, info_from_props(props, str(p)), threads)


class OnnxBackend(Backend):
    """(N, 1, S, S) float32 in [0, 1] -> (N, C) probabilities, on onnxruntime."""

    name = "onnx"
    concurrent_runs = True  # one session serves concurrent run() calls (the bulk pipeline's tail)

    def __init__(
        self, path: str | os.PathLike | None, *, threads: int | None = None, providers: list[str] | None = None
    ) -> None:
        self.path = resolve_onnx_path(path)
        self.providers = providers or ["CPUExecutionProvider"]
        self.session = ort_session(self.path, threads=threads, providers=self.providers)
        self.info = info_from_props(dict(self.session.get_modelmeta().custom_metadata_map), str(self.path))
        self.quantization = self.info.quantization
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = [o.name for o in outputs]
        extra = names[1:]
        if (
            len(inputs) != 1
            or not names
            or names[0] != OUTPUT_NAME
            or any(n not in (FEATURES_NAME, SCORE_NAME, CAM_NAME) for n in extra)
            or len(set(extra)) != len(extra)
        ):
            raise BundleError(
                f"{self.path}: expected one input and the outputs {OUTPUT_NAME} [, {FEATURES_NAME}] [, {SCORE_NAME}] "
                f"[, {CAM_NAME}], "
                f"found {len(inputs)} inputs and {names}"
            )
        self.has_score = SCORE_NAME in extra
        self.has_features = FEATURES_NAME in extra
        self.has_cam = CAM_NAME in extra
        self.input_name = inputs[0].name
        size = self.info.meta.preprocessing.size
        shape = list(inputs[0].shape)
        if len(shape) != 4 or shape[1:] != [1, size, size]:
            raise BundleError(f"{self.path}: graph input has shape {shape}, the metadata says (N, 1, {size}, {size})")
        n_out = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(n_out, int) and n_out != len(self.info.meta.labels):
            raise BundleError(f"{self.path}: graph gives {n_out} outputs for {len(self.info.meta.labels)} labels")
        self.input_shape = (1, size, size)
        self.post = post_calibration(self.info, str(self.path))

    def worker_recipe(self) -> "functools.partial[OnnxBackend] | None":
        """How a bulk-predict worker process rebuilds this backend (one thread each), or None
        when the session runs on an accelerator, which one process should drive."""
        if self.providers != ["CPUExecutionProvider"]:
            return None
        return functools.partial(OnnxBackend, str(self.path), threads=1)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, input-check scores or None); a calibrator, if any, is in the graph."""
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ChestXrayError(
                f"onnx backend: expected a batch of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {batch.shape}"
            )
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.info.meta.labels)), np.float32), None
        x = np.ascontiguousarray(batch, dtype=np.float32)
        wanted = [OUTPUT_NAME] + ([SCORE_NAME] if self.has_score else [])
        out = self.session.run(wanted, {self.input_name: x})
        probs = out[0] if self.post is None else self.post.apply_probabilities(out[0]).astype(np.float32)
        return probs, (out[1] if self.has_score else None)

    def run_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, (N, C, h, w) class activation maps) from one pass."""
        if not self.has_cam:
            raise ChestXrayError(
                f"{self.path}: this ONNX file has no {CAM_NAME} output for Grad-CAM; export the bundle again "
                "with this version of chestxray (ResNet-like heads), or use the torch backend"
            )
        x = np.ascontiguousarray(batch, dtype=np.float32)
        probs, maps = self.session.run([OUTPUT_NAME, CAM_NAME], {self.input_name: x})
        return probs, maps

    def features(self, batch: np.ndarray) -> np.ndarray:
        """(N, D) pooled feature vectors, from the graph's "features" output."""
        if not self.has_features:
            raise ChestXrayError(
                f"{self.path}: this ONNX file has no features output; export the bundle again with this "
                "version of chestxray, or use the torch backend"
            )
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([FEATURES_NAME], {self.input_name: x})[0]
