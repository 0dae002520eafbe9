"""`chestxray predict PATH...`: findings for image files and folders (PNG, JPEG, DICOM).

Imports nothing heavy at module level, so the command also works in a torch-less
install with `--backend onnx`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.commands._bulk import (
    add_bulk_args,
    check_any,
    check_bulk_args,
    emit,
    listed_datasets,
    run_bulk,
    setup,
)
from chestxray.commands._common import add_dataset_args, add_model_args, positive_int, resolve_device_arg
from chestxray.errors import ChestXrayError

if TYPE_CHECKING:
    from chestxray.inference.predict import Analyzer, Prediction

FORMATS = ("table", "json", "csv", "jsonl", "parquet")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="findings for image files or folders (PNG, JPEG, DICOM), optionally with Grad-CAM overlays",
        description="Every finding with its probability, the model's threshold and whether it is positive "
        "(positives first), per image. Folders are searched recursively. Exit status 1 when "
        "some files could not be read (they are reported; the others finish). " + NOT_FOR_CLINICAL_USE,
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders and/or globs (quoted)")
    add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="output format (default table); csv, jsonl and parquet stream to --out as results arrive",
    )
    p.add_argument("--out", metavar="FILE", help="write the output to FILE (atomically) instead of stdout")
    add_bulk_args(p)
    add_dataset_args(p)  # --views, the val carve, csv specs: as the other commands that open a root
    p.add_argument(
        "--cam",
        metavar="DIR",
        help="also write Grad-CAM overlays (original size, with a colour bar) to DIR, one PNG per image and "
        "finding, named NAME_EXT_FINDING_PROB.png (x.png -> x_png_Effusion_0.63.png; inputs with the same file "
        "name in different folders get their folder names in front: a_x_png_..., b_x_png_...); the table and "
        "the JSON list each overlay's path; needs the torch backend",
    )
    p.add_argument(
        "--findings",
        metavar="A,B",
        help="with --cam: the findings to explain (default: the positive ones, or the most "
        "probable one when none is positive)",
    )
    p.add_argument(
        "--features",
        metavar="OUT",
        help="instead of findings, write each image's pooled feature vector to OUT: .npy (rows in input "
        "order; NaN rows for unreadable files), .csv or .parquet (a 'file' column, then f0, f1, ...)",
    )
    p.add_argument(
        "--dicom-out",
        metavar="DIR",
        help="for DICOM inputs, also write a structured report (TID 1500 SR) per image to DIR, and with --cam a "
        "Secondary Capture per positive finding's overlay (needs the pacs extra; --format table or json)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray.inference.inputs import Shard, iter_inputs
    from chestxray.inference.predict import Analyzer

    findings = parse_findings(args.findings)
    if args.dicom_out:
        from chestxray.pacs.offline import check_dicom_out

        check_dicom_out(args.format)
    if findings is not None and not args.cam:
        raise ChestXrayError("--findings only applies with --cam DIR")
    if not args.paths and not args.from_list and not args.dataset:
        raise ChestXrayError("give image files or folders (PATH...), --from-list FILE or --dataset ROOT")
    check_bulk_args(args)
    args.listed_datasets = listed_datasets(args)
    from chestxray.inference.predict import resolve_backend

    backend = resolve_backend(args.model, args.backend)
    if args.cam and backend != "torch":
        raise ChestXrayError("--cam needs the torch backend (Grad-CAM takes gradients of the network)")
    device = resolve_device_arg(args.device, backend)
    if args.features:
        if args.cam:
            raise ChestXrayError("--features writes feature vectors instead of findings; it does not take --cam")
        shard = Shard.parse(args.shard) if args.shard else Shard()
        feature_files = [Path(f.path) for f in iter_inputs(args.paths, args.from_list, shard, args.listed_datasets)]
        if not feature_files:
            check_any(0, args)
        analyzer = Analyzer.load(args.model, backend=backend, device=device, batch_size=args.batch_size)
        progress = not args.no_progress and len(feature_files) > 1 and sys.stderr.isatty()
        return write_features(analyzer, feature_files, Path(args.features), progress)
    if not args.cam:
        info, device = setup(args, device)  # also starts the decoders' fork server early
        # Decoder processes use the other cores: one inference thread avoids oversubscribing them.
        threads = 1 if args.workers != 0 else None
        # ONNX: the session is built only if this process infers, in a thread while the decoders start.
        analyzer = Analyzer.load(
            args.model, backend=backend, device=device, batch_size=args.batch_size, threads=threads, background=True
        )
        with quiet_skip_warnings():  # failures are listed once, at the end
            return run_bulk(args, analyzer, info, _with_dicom_out(args, analyzer, backend))
    shard = Shard.parse(args.shard) if args.shard else Shard()
    files = [Path(f.path) for f in iter_inputs(args.paths, args.from_list, shard, args.listed_datasets)]
    if not files:
        check_any(0, args)
    analyzer = Analyzer.load(args.model, backend=backend, device=device, batch_size=args.batch_size)
    progress = not args.no_progress and len(files) > 1 and sys.stderr.isatty()
    with quiet_skip_warnings():  # failures are listed once, at the end
        predictions = predict_with_cams(analyzer, files, Path(args.cam), findings, progress)
    return emit(args, analyzer, predictions, _with_dicom_out(args, analyzer, backend))


def _with_dicom_out(args: argparse.Namespace, analyzer: "Analyzer", backend: str) -> Any:
    """`render`, writing the DICOM results first when --dicom-out is given (chestxray.pacs)."""
    if not args.dicom_out:
        return render
    from chestxray.pacs.offline import with_dicom_out

    return with_dicom_out(render, args.dicom_out, analyzer, args.model, backend)


FEATURE_SUFFIXES = (".npy", ".csv", ".parquet")


def write_features(analyzer: "Analyzer", files: Sequence[Path], out: Path, progress: bool) -> int:
    """`--features OUT`: the pooled feature vectors of `files`, written atomically."""
    import numpy as np

    from chestxray.io import atomic_write

    if out.suffix not in FEATURE_SUFFIXES:
        raise ChestXrayError(f"--features {out}: the file should end in {', '.join(FEATURE_SUFFIXES)}")
    emb = analyzer.embed([str(f) for f in files], progress=progress)
    if out.suffix == ".npy":

        def save_npy(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # np.save on a path would add ".npy" to the temporary name
                np.save(fh, emb.vectors, allow_pickle=False)

        atomic_write(out, save_npy)
    else:
        import pandas as pd

        frame = pd.DataFrame(emb.vectors, columns=[f"f{i}" for i in range(emb.vectors.shape[1])])
        frame.insert(0, "file", emb.files)
        if out.suffix == ".csv":
            atomic_write(out, lambda tmp: frame.to_csv(tmp, index=False))
        else:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ChestXrayError("--features .parquet needs pyarrow: pip install 'chestxray[archive]'") from None
            atomic_write(out, lambda tmp: frame.to_parquet(tmp, index=False))
    print(
        f"wrote {emb.vectors.shape[0]} feature vectors of {emb.vectors.shape[1]} values to {out}; model {analyzer.name}",
        file=sys.stderr,
    )
    for i, reason in emb.errors.items():
        print(f"  {emb.files[i]}: {reason}", file=sys.stderr)
    return 1 if emb.errors else 0


def parse_findings(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ChestXrayError("--findings needs at least one finding name, e.g. --findings Cardiomegaly,Effusion")
    return names


@contextmanager
def quiet_skip_warnings() -> Iterator[None]:
    """The Analyzer logs each unreadable file; the command lists them itself at the end."""
    logger = logging.getLogger("chestxray.inference.predict")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def predict_with_cams(
    analyzer: "Analyzer", files: Sequence[Path], cam_dir: Path, findings: Sequence[str] | None, progress: bool
) -> list["Prediction"]:
    """Predict each file with one Grad-CAM pass and write its overlays; the predictions
    come from the same forward pass as the maps, and list the overlays they wrote."""
    from tqdm.auto import tqdm

    from chestxray.errors import ImageReadError
    from chestxray.inference.explain import explain_image, resolve_findings

    resolve_findings(analyzer.labels, findings)  # unknown names fail before any work
    _ = analyzer.model  # a backend without a torch model fails before any work
    cam_dir.mkdir(parents=True, exist_ok=True)
    names = overlay_names(files)
    out: list[Prediction] = []
    for path in tqdm(files, desc="predict+cam", unit="img", disable=not progress):
        name = str(path)
        try:
            gray, prediction, cams = explain_image(analyzer, path, findings, name)
        except ImageReadError as exc:
            out.append(analyzer.result(name, error=exc.reason))
            continue
        prediction.overlays = []
        for cam in cams:
            target = cam_dir / f"{names[name]}_{cam.finding}_{cam.probability:.2f}.png"
            write_overlay(target, gray, cam, analyzer)
            prediction.overlays.append({"finding": cam.finding, "path": str(target), "note": cam.note})
        out.append(prediction)
    return out


def overlay_names(files: Sequence[Path]) -> dict[str, str]:
    """The name each input's overlays start with: its file name with the dot as "_"
    (x.png -> x_png, so x.png and x.dcm differ), with as many parent folders in front
    as it takes to tell apart inputs that share a file name (a/x.png -> a_x_png)."""
    unique = sorted({str(p): p for p in files}.values(), key=str)

    def name(p: Path, depth: int) -> str:
        parts = [*p.parent.parts[len(p.parent.parts) - depth + 1 :], p.name] if depth > 1 else [p.name]
        return "_".join(part.replace(".", "_") for part in parts if part not in ("/", "")).strip("_") or "input"

    out: dict[str, str] = {}
    groups: dict[str, list[Path]] = {}
    for p in unique:
        groups.setdefault(p.name, []).append(p)
    for group in groups.values():
        depth = 1
        while len({name(p, depth) for p in group}) < len(group) and depth <= max(len(p.parts) for p in group):
            depth += 1
        for p in group:
            out[str(p)] = name(p, depth)
    clash = {v for v in out.values() if list(out.values()).count(v) > 1}  # x_y.png vs x/y.png: whole paths
    for key, value in out.items():
        if value in clash:
            out[key] = name(Path(key).resolve(), len(Path(key).resolve().parts))
    return out


def write_overlay(target: Path, gray: Any, cam: Any, analyzer: "Analyzer") -> Path:
    """The overlay with its caption on top and, when there is a map to read, the colour
    bar below (as the viewer shows beside its overlays)."""
    from PIL import Image

    from chestxray.inference.explain import cam_caption, draw_caption, overlay, with_colour_bar
    from chestxray.io import atomic_write

    threshold = float(analyzer.thresholds[analyzer.labels.index(cam.finding)])
    rgb = draw_caption(overlay(gray, cam.heatmap), cam_caption(cam, analyzer.name, threshold))
    if cam.has_evidence:
        rgb = with_colour_bar(rgb)
    return atomic_write(target, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


# ---- output formats -----------------------------------------------------------------


def render(predictions: Sequence["Prediction"], fmt: str, model_name: str) -> str:
    if fmt == "json":
        return json.dumps([p.to_dict() for p in predictions], indent=2) + "\n"
    if fmt == "csv":
        return to_csv(predictions)
    if fmt == "table":
        return to_table(predictions, model_name)
    raise ChestXrayError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def to_csv(predictions: Sequence["Prediction"]) -> str:
    """Long format: one row per image and finding; a failed image has one row with its error."""
    from chestxray.inference.outputs import CSV_COLUMNS, csv_rows

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in predictions:
        writer.writerows(csv_rows(p.to_dict()))
    return buf.getvalue()


def to_table(predictions: Sequence["Prediction"], model_name: str) -> str:
    ok = sum(p.ok for p in predictions)
    policy = next((p.threshold_policy for p in predictions if p.threshold_policy), None)
    head = f"model {model_name}: {ok} of {len(predictions)} images analysed"
    lines = [head + (f" (thresholds: policy {policy})" if policy else ""), NOT_FOR_CLINICAL_USE]
    for p in predictions:
        lines += ["", p.file]
        if not p.ok:
            lines.append(f"  error: {p.error}")
            continue
        positives = [f.finding for f in p.positives]
        lines.append(f"  positive: {', '.join(positives) if positives else 'none'}")
        lines += [f"  warning: {w}" for w in p.warnings]
        lines.append(f"  {'finding':<20}{'probability':>12}{'threshold':>11}  positive")
        for f in p.findings:
            lines.append(f"  {f.finding:<20}{f.probability:>12.3f}{f.threshold:>11.3f}  {'YES' if f.positive else '-'}")
        for o in p.overlays or []:
            lines.append(f"  Grad-CAM {o['finding']}: {o['path']}" + (f" ({o['note']})" if o["note"] else ""))
    return "\n".join(lines) + "\n"
