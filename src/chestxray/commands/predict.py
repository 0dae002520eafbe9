"""`chestxray predict PATH...`: findings for image files and folders (PNG, JPEG, DICOM).

Imports nothing heavy at module level, so the command also works in a torch-less
install with `--backend onnx`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.commands._common import (
    ROOT_HELP,
    add_dataset_args,
    add_model_args,
    dataset_options,
    non_negative_float,
    non_negative_int,
    positive_int,
    resolve_device_arg,
)
from chestxray.errors import ChestXrayError

if TYPE_CHECKING:
    from chestxray.inference.bulk import BulkRequest, BulkResult
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
        help="output format (default table); csv, jsonl and parquet stream to --out as results arrive. File names "
        "that are not UTF-8 are written with each odd byte as \\xHH (backslashes doubled); CSV cells starting "
        "with = + - @ ' or a tab or CR get a ' in front (JSON Lines and Parquet keep the name)",
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
        "the JSON list each overlay's path; on the onnx backend, needs a file exported with Grad-CAM maps "
        "(the packaged one has them)",
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


def add_bulk_args(p: argparse.ArgumentParser) -> None:
    from chestxray.data.index import ALL_SPLITS

    p.add_argument(
        "--from-list", metavar="FILE", help="also predict the paths listed in FILE, one per line (a pipe works too)"
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="ROOT",
        help=f"also predict the images of a {ROOT_HELP} (read from its index, in its order; frontal views unless "
        "--views says otherwise); may be repeated",
    )
    p.add_argument(
        "--split",
        choices=ALL_SPLITS,
        default=None,
        help="with --dataset: only this split (default all; val is carved as in train/evaluate)",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="decoder processes (default: all cores, shared among torchrun ranks on a node; 0: decode in-process)",
    )
    p.add_argument("--shard", metavar="I/N", help="predict only shard I of N (I from 0), e.g. for a job array")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted --out run (csv, jsonl, parquet): files already there (same path, size "
        "and mtime) are skipped; refused when the run's inputs, working folder or --shard differ from the "
        "interrupted one's",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: continue even when the inputs or --shard differ; the journal's results of files "
        "this run does not list are dropped (their number is printed), the others are kept",
    )
    p.add_argument(
        "--max-file-mb",
        type=float,
        default=None,
        metavar="MB",
        help="refuse (as an error row) files larger than MB before reading them (default 512; 0: no limit)",
    )
    p.add_argument(
        "--progress-every",
        type=non_negative_float,
        default=30.0,
        metavar="S",
        help="without a terminal: one progress line every S seconds on stderr (default 30; 0: none)",
    )


def bulk_request(args: argparse.Namespace) -> "BulkRequest":
    """The request of predict's arguments; dataset roots are read now, so a wrong one fails
    before the model loads."""
    from chestxray.inference.bulk import BulkRequest
    from chestxray.inference.inputs import Shard, dataset_paths

    if args.split is not None and not args.dataset:
        raise ChestXrayError("--split only applies with --dataset ROOT")
    if args.cam and (args.resume or args.format in ("jsonl", "parquet")):
        raise ChestXrayError(
            "--cam writes overlays one image at a time; use --format table, json or csv without --resume"
        )
    if args.resume and not (args.out and args.format in ("csv", "jsonl", "parquet")):
        raise ChestXrayError("--resume needs --out FILE with --format csv, jsonl or parquet")
    if args.force and not args.resume:
        raise ChestXrayError("--force only applies with --resume")
    if args.format == "parquet" and not args.out:
        raise ChestXrayError("--format parquet needs --out FILE")
    opts = dataset_options(args)
    return BulkRequest(
        paths=list(args.paths),
        from_list=args.from_list,
        datasets=[dataset_paths(spec, args.split or "all", opts) for spec in args.dataset],
        dataset_specs=list(args.dataset),
        split=args.split,
        shard=Shard.parse(args.shard) if args.shard else Shard(),
        fmt=args.format,
        out=Path(args.out) if args.out else None,
        workers=args.workers,
        batch_size=args.batch_size,
        resume=args.resume,
        force=args.force,
        progress=not args.no_progress,
        progress_every_s=args.progress_every,
    )


def read_limits(args: argparse.Namespace) -> Any:
    from chestxray.data.images import DecodeLimits

    if args.max_file_mb is None:
        return None
    if not args.max_file_mb >= 0 or args.max_file_mb == float("inf"):
        raise ChestXrayError(f"--max-file-mb: expected a size in MB, 0 or more, got {args.max_file_mb}")
    return DecodeLimits(max_file_bytes=int(args.max_file_mb * 2**20) if args.max_file_mb else None)


def run(args: argparse.Namespace) -> int:
    from chestxray.inference import bulk
    from chestxray.inference.predict import Analyzer, resolve_backend

    findings = parse_findings(args.findings)
    if args.dicom_out:
        from chestxray.pacs.offline import check_dicom_out

        check_dicom_out(args.format)
    if findings is not None and not args.cam:
        raise ChestXrayError("--findings only applies with --cam DIR")
    if not args.paths and not args.from_list and not args.dataset:
        raise ChestXrayError("give image files or folders (PATH...), --from-list FILE or --dataset ROOT")
    limits = read_limits(args)
    request = bulk_request(args)
    backend = resolve_backend(args.model, args.backend)
    device = resolve_device_arg(args.device, backend)
    if args.features or args.cam:
        if args.features and args.cam:
            raise ChestXrayError("--features writes feature vectors instead of findings; it does not take --cam")
        if request.out is not None:
            bulk.check_output_file(request.out)
        from chestxray.io import check_writable

        if args.cam:
            check_writable(Path(args.cam) / "overlay.png")
        else:
            check_features_out(Path(args.features))
            check_writable(args.features)
        files = [Path(f.path) for f in request.files()]
        bulk.check_any(len(files), request)
        analyzer = Analyzer.load(args.model, backend=backend, device=device, batch_size=args.batch_size)
        analyzer.read_limits = limits
        progress = not args.no_progress and len(files) > 1 and sys.stderr.isatty()
        if args.features:
            return write_features(analyzer, files, Path(args.features), progress)
        with quiet_skip_warnings():  # failures are listed once, at the end
            predictions = predict_with_cams(analyzer, files, Path(args.cam), findings, progress)
        return emit(args, analyzer, predictions)
    info, device = bulk.prepare(request, device)
    # Decoder processes use the other cores: one inference thread avoids oversubscribing them.
    threads = 1 if args.workers != 0 else None
    # ONNX: the session is built only if this process infers, in a thread while the decoders start.
    analyzer = Analyzer.load(
        args.model, backend=backend, device=device, batch_size=args.batch_size, threads=threads, background=True
    )
    analyzer.read_limits = limits
    with quiet_skip_warnings():  # failures are listed once, at the end
        result = bulk.run(request, analyzer, info)
    return report(args, analyzer, result)


def report(args: argparse.Namespace, analyzer: "Analyzer", result: "BulkResult") -> int:
    """Print what a bulk run did; render the predictions it returned. Exit status 1 when
    some files could not be read."""
    from chestxray.inference.bulk import model_label

    for note in result.notes:
        print(note, file=sys.stderr)
    if result.predictions is not None:
        return emit(args, analyzer, result.predictions)
    if result.already_complete:
        return 0
    if not result.is_main:
        return 1 if result.errors else 0
    if result.wrote is not None:
        print(
            f"wrote {result.total} predictions ({args.format}) to {result.wrote}; model {model_label(analyzer)}. "
            f"{NOT_FOR_CLINICAL_USE}",
            file=sys.stderr,
        )
    else:
        print(f"model {model_label(analyzer)}. {NOT_FOR_CLINICAL_USE}", file=sys.stderr)
    return report_failures(result.failures, result.total, result.errors)


def emit(args: argparse.Namespace, analyzer: "Analyzer", predictions: list["Prediction"]) -> int:
    """Write a finished list of predictions (table/json/csv) to --out or stdout, then list the
    unreadable files; the exit status is 1 when there were any. When --out cannot be
    written, the text goes to stdout instead: nothing computed is lost."""
    from chestxray.inference.bulk import model_label

    label = model_label(analyzer)
    if args.dicom_out:  # the SR (and SCs) of each DICOM input, before the usual output
        from chestxray.pacs.offline import write_dicom_results

        write_dicom_results(predictions, Path(args.dicom_out), analyzer, args.model, analyzer.backend.name)
    text = render(predictions, args.format, label)
    if args.out:
        from chestxray.io import atomic_write_text

        try:
            atomic_write_text(args.out, text)
        except OSError as exc:
            sys.stdout.write(text)
            raise ChestXrayError(
                f"{args.out}: cannot write ({exc.strerror or type(exc).__name__}); the results went to stdout instead"
            ) from None
        print(
            f"wrote {len(predictions)} predictions ({args.format}) to {args.out}; model {label}. "
            f"{NOT_FOR_CLINICAL_USE}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
        if args.format != "table":
            print(f"model {label}. {NOT_FOR_CLINICAL_USE}", file=sys.stderr)
    if args.cam:
        written = sum(len(p.overlays or []) for p in predictions)
        print(f"wrote {written} Grad-CAM overlays to {Path(args.cam).resolve()}", file=sys.stderr)
    failed = [(p.file, p.error) for p in predictions if p.error]
    return report_failures(failed[:20], len(predictions), len(failed))


def report_failures(failed: Sequence[tuple[str, str | None]], n: int, count: int, show: int = 20) -> int:
    from chestxray.inference.outputs import printable

    if not count:
        return 0
    print(f"chestxray predict: {count} of {n} files could not be read:", file=sys.stderr)
    for name, error in failed[:show]:
        print(f"  {printable(name)}: {printable(error or '')}", file=sys.stderr)
    if count > show:
        print(f"  ... and {count - show} more (see the error column)", file=sys.stderr)
    return 1


FEATURE_SUFFIXES = (".npy", ".csv", ".parquet")


def check_features_out(out: Path) -> None:
    if out.suffix not in FEATURE_SUFFIXES:
        raise ChestXrayError(f"--features {out}: the file should end in {', '.join(FEATURE_SUFFIXES)}")
    if out.is_dir():
        raise ChestXrayError(f"--features {out}: is a folder; name the output file")


def write_features(analyzer: "Analyzer", files: Sequence[Path], out: Path, progress: bool) -> int:
    """`--features OUT`: the pooled feature vectors of `files`, written atomically."""
    import numpy as np

    from chestxray.io import atomic_write

    check_features_out(out)
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
    from chestxray.inference.explain import check_cam_support, explain_image, resolve_findings

    resolve_findings(analyzer.labels, findings)  # unknown names fail before any work
    check_cam_support(analyzer)  # a model that cannot give maps fails before any work
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
            try:
                write_overlay(target, gray, cam, analyzer)
            except OSError as exc:
                raise ChestXrayError(f"{target}: cannot write ({exc.strerror or type(exc).__name__})") from None
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
    return {key: _fit_name(value) for key, value in out.items()}


# Overlay names add "_FINDING_0.63.png" (at most 32 bytes) to these; file names hold 255 bytes.
MAX_OVERLAY_STEM_BYTES = 200


def _fit_name(stem: str) -> str:
    """A stem short enough for a file name: a long one is cut and ends in a hash of the whole
    (so two long names that share a start still differ)."""
    import hashlib
    import os

    raw = os.fsencode(stem)
    if len(raw) <= MAX_OVERLAY_STEM_BYTES:
        return stem
    digest = hashlib.sha256(raw).hexdigest()[:12]
    cut = raw[: MAX_OVERLAY_STEM_BYTES - 13].decode("utf-8", "ignore")  # never half a character
    return f"{cut}_{digest}"


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
        from chestxray.inference.outputs import public_record

        return json.dumps([public_record(p.to_dict()) for p in predictions], indent=2) + "\n"
    if fmt == "csv":
        return to_csv(predictions)
    if fmt == "table":
        return to_table(predictions, model_name)
    raise ChestXrayError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def to_csv(predictions: Sequence["Prediction"]) -> str:
    """Long format: one row per image and finding; a failed image has one row with its error."""
    from chestxray.inference.outputs import CSV_COLUMNS, CsvOut, csv_rows

    buf = io.StringIO()
    writer = CsvOut(buf)
    writer.writerow(CSV_COLUMNS)
    for p in predictions:
        writer.writerows(csv_rows(p.to_dict()))
    return buf.getvalue()


def to_table(predictions: Sequence["Prediction"], model_name: str) -> str:
    """Names, errors and warnings with control and bidi characters escaped (`printable`)."""
    from chestxray.inference.outputs import printable

    ok = sum(p.ok for p in predictions)
    policy = next((p.threshold_policy for p in predictions if p.threshold_policy), None)
    head = f"model {model_name}: {ok} of {len(predictions)} images analysed"
    lines = [head + (f" (thresholds: policy {policy})" if policy else ""), NOT_FOR_CLINICAL_USE]
    for p in predictions:
        lines += ["", printable(p.file)]
        if not p.ok:
            lines.append(f"  error: {printable(p.error or '')}")
            continue
        positives = [f.finding for f in p.positives]
        lines.append(f"  positive: {', '.join(positives) if positives else 'none'}")
        lines += [f"  warning: {printable(w)}" for w in p.warnings]
        lines.append(f"  {'finding':<20}{'probability':>12}{'threshold':>11}  positive")
        for f in p.findings:
            lines.append(f"  {f.finding:<20}{f.probability:>12.3f}{f.threshold:>11.3f}  {'YES' if f.positive else '-'}")
        for o in p.overlays or []:
            lines.append(
                f"  Grad-CAM {o['finding']}: {printable(o['path'])}" + (f" ({o['note']})" if o["note"] else "")
            )
    return "\n".join(lines) + "\n"
