"""Streaming, resumable result files for bulk prediction (CSV, JSON Lines, Parquet).

While a run goes, every result is appended to a journal next to the output, OUT.partial
(JSON Lines whatever the final format: one record per file with its path, size and mtime,
flushed after each batch). `--resume` reads the journal back, drops a torn last line, and
skips the files whose (path, size, mtime) it already holds. At the end the journal is
converted, streaming, into the requested format and renamed over OUT in one step
(`chestxray.io.atomic_write`); then the journal is removed. Under torchrun every rank keeps
its own journal and rank 0 merges them into one output.

The journal starts with a header line naming the run's inputs and shard; `--resume` refuses
a journal of other inputs or another shard (`force`: its rows of files not listed now are
dropped).

File names in the outputs: a name that is not valid UTF-8 (or holds a NUL byte) is written
in an escaped form, each such byte as `\\xHH` and each backslash doubled (`escape_name`;
`codecs.escape_decode` gives the bytes back). CSV cells that start with `=`, `+`, `-`, `@`,
a tab, a CR or `'` get a `'` in front (OWASP's advice against formula injection; JSON Lines
and Parquet keep the name as it is), and a row with a CR in a cell is quoted whole.

Rows are in input order (the listing order; with shards, merged back into it). A resumed
run equals an uninterrupted one when the files did not change in between; a file that
changed is predicted again and its new row goes to the end.
"""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from chestxray.errors import ChestXrayError
from chestxray.inference.inputs import InputFile

if TYPE_CHECKING:
    from chestxray.inference.predict import Prediction

STREAM_FORMATS = ("csv", "jsonl", "parquet")
CSV_COLUMNS = ("file", "model", "variant", "finding", "probability", "threshold", "positive", "error", "warnings")
WARNINGS_SEP = "; "  # the CSV's warnings cell: the image's warnings joined, empty when none
Record = dict[str, Any]


FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")  # "'": so that the prefix can be taken off again
JOURNAL_HEADER = "chestxray_journal"
# Shown escaped on a terminal: they reorder or hide the text around them.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape_name(name: str) -> str:
    """`name` as valid UTF-8 text: unchanged when it is; else (a name the file system gave as
    bytes that are not UTF-8, or one with a NUL) each such byte as \\xHH, backslashes doubled."""
    if "\x00" not in name:
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    raw = name.encode("utf-8", "surrogateescape")  # os.fsencode's bytes, NUL allowed
    return raw.replace(b"\\", b"\\\\").replace(b"\x00", b"\\x00").decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """`text` for a terminal: control, bidi and line-separator characters escaped."""
    text = escape_name(text)
    if text.isprintable() and not BIDI_CONTROLS.intersection(text):
        return text
    out = []
    for ch in text:
        if ch in BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def csv_cell(text: str) -> str:
    """A text cell as spreadsheets may open it: a leading formula character defused."""
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_uncell(text: str) -> str:
    return text[1:] if text.startswith("'") else text


class CsvOut:
    """csv.writer with "\\n" line ends that also quotes a row with a CR in it (the csv
    module quotes only the line terminator's characters)."""

    def __init__(self, stream: IO[str]) -> None:
        self.plain = csv.writer(stream, lineterminator="\n")
        self.quoted = csv.writer(stream, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def writerow(self, row: Sequence[str]) -> None:
        (self.quoted if any("\r" in c for c in row) else self.plain).writerow(row)

    def writerows(self, rows: Iterable[Sequence[str]]) -> None:
        for row in rows:
            self.writerow(row)


def public_record(rec: Record) -> Record:
    """A record as outputs show it: its file name escaped (`escape_name`)."""
    name = escape_name(rec["file"])
    return rec if name == rec["file"] else {**rec, "file": name}


def to_record(file: InputFile, prediction: "Prediction") -> Record:
    """The journal/JSON Lines record: the prediction's JSON plus the file's size and mtime."""
    rec = prediction.to_dict()
    return {"file": rec.pop("file"), "size": file.size, "mtime_ns": file.mtime_ns, **rec}


def record_key(rec: Record) -> tuple[str, int, int]:
    return (rec["file"], int(rec.get("size", -1)), int(rec.get("mtime_ns", -1)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _well_formed(rec: dict[str, Any]) -> bool:
    """True when every field the outputs read has the type `to_record` gives it (optional
    fields may be missing: journals of older versions lack some)."""
    findings = rec.get("findings", [])
    return (
        isinstance(findings, list)
        and all(
            isinstance(f, dict)
            and isinstance(f.get("finding"), str)
            and _is_number(f.get("probability"))
            and _is_number(f.get("threshold"))
            and isinstance(f.get("positive"), bool)
            for f in findings
        )
        and isinstance(rec.get("warnings") or [], list)
        and all(isinstance(w, str) for w in rec.get("warnings") or [])
        and all(isinstance(rec.get(k), (str, type(None))) for k in ("model", "variant", "error"))
    )


def _checked_key(rec: Any) -> tuple[str, int, int] | None:
    """The key of a well-formed record, else None."""
    if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or not _well_formed(rec):
        return None
    try:
        return record_key(rec)
    except (TypeError, ValueError, OverflowError):  # e.g. a size of 1e400 (inf) or NaN
        return None


def csv_rows(rec: Record) -> Iterator[list[str]]:
    """Long format: one row per finding; a failed image has one row with its error."""
    variant = csv_cell(rec.get("variant", ""))
    warnings = csv_cell(WARNINGS_SEP.join(rec.get("warnings") or ()))
    name, model = csv_cell(escape_name(rec["file"])), csv_cell(rec["model"])
    if rec.get("error"):
        yield [name, model, variant, "", "", "", "", csv_cell(rec["error"]), warnings]
    for f in rec.get("findings", ()):
        yield [
            name,
            model,
            variant,
            f["finding"],
            f"{f['probability']:.6f}",
            f"{f['threshold']:.6f}",
            "true" if f["positive"] else "false",
            "",
            warnings,
        ]


# ---- the journal ----------------------------------------------------------------------


def journal_path(out: Path, rank: int = 0, world: int = 1) -> Path:
    return out.with_name(f"{out.name}.partial" if world == 1 else f"{out.name}.part{rank}of{world}.partial")


def read_journal(path: Path) -> tuple[list[tuple[tuple[str, int, int], str]], int, Record | None]:
    """(key, model) of each record of a journal up to its last complete line, that line's
    end offset (a kill -9 can leave half a line; it is cut off on resume) and the journal's
    header (None in a journal written before headers). Only the keys are kept, not the
    records: memory stays small for a long journal. A complete line that is not a result
    record is refused: the journal is not this program's, or was edited."""
    keys: list[tuple[tuple[str, int, int], str]] = []
    end = 0
    header: Record | None = None
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except ValueError:
                rec = ...  # a torn write is the last line; anywhere else it is damage
            if n == 1 and isinstance(rec, dict) and JOURNAL_HEADER in rec:
                header = rec
                end += len(line)
                continue
            key = _checked_key(rec)
            if key is None:
                if rec is ... and not f.read(1):
                    break  # the last line, torn
                raise ChestXrayError(f"{path}: line {n} is not a result record; move the journal away to start over")
            keys.append((key, str(rec.get("model"))))
            end += len(line)
    return keys, end, header


def iter_journal(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                rec = json.loads(line)
                if JOURNAL_HEADER not in rec:
                    yield rec


def spec_differences(old: Record, new: Record) -> list[str]:
    """What differs between two runs' inputs and shards, in words (bounded in length)."""

    def show(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 200 else text[:200] + "..."

    return [
        f"{key} {show(old.get(key))} in the journal, {show(new.get(key))} now"
        for key in ("inputs", "shard")
        if old.get(key) != new.get(key)
    ]


class Journal:
    """OUT.partial, appended as results arrive. With `resume`, the records already there
    are kept (their keys in `done`) and new ones appended after them. `spec`: the run's
    inputs and shard, kept in the header; a journal of another spec is refused unless
    `force`, which drops its records of files this run does not list (`discarded`)."""

    def __init__(
        self, path: Path, *, resume: bool, model_name: str, spec: Record | None = None, force: bool = False
    ) -> None:
        self.path = path
        self.spec = spec
        self.done: dict[str, tuple[str, int, int]] = {}
        self.stale: set[tuple[str, int, int]] = set()
        self.matched: set[str] = set()
        self.written = 0
        self.discarded = 0
        self._new_header = False
        if path.exists() and not resume:
            raise ChestXrayError(
                f"{path} holds an interrupted run: pass resume=True to continue it, or delete it to start over"
            )
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            keys, end, header = read_journal(path)
            differs = spec_differences(header, spec) if header is not None and spec is not None else []
            if differs and not force:
                raise ChestXrayError(
                    f"{path} is the journal of another run ({'; '.join(differs)}); resume with the same inputs "
                    "and shard=, or add force=True to drop its results of files not listed now"
                )
            self._new_header = bool(differs) or (header is None and spec is not None)
            for key, model in keys:
                if model != model_name:
                    raise ChestXrayError(
                        f"{path}: was written by model {model!r}, this run uses {model_name!r}; "
                        "resume with the same model or write to a new out=FILE"
                    )
                self.done[key[0]] = key
            with open(path, "r+b") as f:
                f.truncate(end)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[bytes] = open(path, "ab")  # noqa: SIM115  # stays open for the whole run; closed in close/abort
        if fresh and spec is not None:
            self._f.write(self._header())
            self._f.flush()

    def _header(self) -> bytes:
        return json.dumps({JOURNAL_HEADER: 1, **(self.spec or {})}).encode() + b"\n"

    def skip(self, file: InputFile) -> bool:
        """True when this file's result is already in the journal; a changed file (same
        path, other size or mtime) is predicted again and its old record dropped."""
        old = self.done.get(file.path)
        if old is None:
            return False
        if old == file.key:
            self.matched.add(file.path)
            return True
        self.stale.add(old)
        return False

    def append(self, records: Sequence[Record]) -> None:
        if records:
            self._f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))
            self._f.flush()
            self.written += len(records)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        # Records of files changed or gone since the interrupted run: rewrite without them.
        if self.stale or len(self.matched) < len(self.done) or self._new_header:
            keep_old = {self.done[p] for p in self.matched}
            old_keys = set(self.done.values())
            self.discarded = len(self.done) - len(self.matched) - len(self.stale)
            rows = (r for r in iter_journal(self.path) if record_key(r) not in old_keys or record_key(r) in keep_old)
            from chestxray.io import atomic_write

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    f.write(self._header() if self.spec is not None else b"")
                    for rec in rows:
                        f.write(json.dumps(rec).encode() + b"\n")

            atomic_write(self.path, write)

    def abort(self) -> None:
        self._f.close()
        if not self.written and not self.done:
            self.path.unlink(missing_ok=True)  # nothing to resume (e.g. the model failed to load)


# ---- final files -----------------------------------------------------------------------


def write_jsonl(path: Path, records: Iterable[Record]) -> None:
    with open(path, "wb") as f:
        for rec in records:
            f.write(json.dumps(public_record(rec)).encode() + b"\n")


def write_csv(path: Path, records: Iterable[Record]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = CsvOut(f)
        writer.writerow(CSV_COLUMNS)
        for rec in records:
            writer.writerows(csv_rows(rec))


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ChestXrayError("fmt='parquet' needs pyarrow: pip install 'chestxray[archive]'") from None
    return pyarrow


def write_parquet(path: Path, records: Iterable[Record], labels: Sequence[str], batch_rows: int = 4096) -> None:
    """One row per file: file, size, mtime_ns, model, variant, error, one probability column per
    finding, `positives` (the positive findings) and `warnings`; thresholds in the schema metadata."""
    pa = _pyarrow()
    fields = [
        pa.field("file", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("variant", pa.string()),
        pa.field("error", pa.string()),
        *(pa.field(label, pa.float64()) for label in labels),
        pa.field("positives", pa.list_(pa.string())),
        pa.field("warnings", pa.list_(pa.string())),
    ]
    thresholds: dict[str, float] = {}
    schema = pa.schema(fields)
    with pa.parquet.ParquetWriter(str(path), schema) as writer:
        batch: list[Record] = []

        def flush() -> None:
            cols: dict[str, list[Any]] = {f.name: [] for f in fields}
            for rec in batch:
                probs = {f["finding"]: f["probability"] for f in rec.get("findings", ())}
                for f in rec.get("findings", ()):
                    thresholds.setdefault(f["finding"], f["threshold"])
                cols["file"].append(escape_name(rec["file"]))
                for key in ("size", "mtime_ns", "model", "variant", "error"):
                    cols[key].append(rec.get(key))
                for label in labels:
                    cols[label].append(probs.get(label))
                cols["positives"].append([f["finding"] for f in rec.get("findings", ()) if f["positive"]])
                cols["warnings"].append(list(rec.get("warnings") or ()))
            writer.write_table(pa.table(cols, schema=schema))
            batch.clear()

        for rec in records:
            batch.append(rec)
            if len(batch) >= batch_rows:
                flush()
        if batch or not thresholds:
            flush()
        writer.add_key_value_metadata({"chestxray.thresholds": json.dumps(thresholds)})


def interleave(parts: Sequence[Iterable[Record]]) -> Iterator[Record]:
    """Round-robin over the ranks' records: shard r holds listing positions k with
    k % n == r, so this restores the listing order."""
    iters = [iter(p) for p in parts]
    while iters:
        alive = []
        for it in iters:
            rec = next(it, None)
            if rec is not None:
                yield rec
                alive.append(it)
        iters = alive


class Summary:
    """Counts of a finished output, and the first failures to show."""

    def __init__(self, show: int = 20) -> None:
        self.total = self.errors = self.duplicates = 0
        self.failures: list[tuple[str, str]] = []
        self.show = show

    def see(self, records: Iterable[Record], seen: set[str]) -> Iterator[Record]:
        for rec in records:
            if rec["file"] in seen:
                self.duplicates += 1  # the same path twice in the listing: one row
                continue
            seen.add(rec["file"])
            self.total += 1
            if rec.get("error"):
                self.errors += 1
                if len(self.failures) < self.show:
                    self.failures.append((rec["file"], rec["error"]))
            yield rec


def finalize(out: Path, fmt: str, journals: Sequence[Path], labels: Sequence[str]) -> Summary:
    """Write OUT from the journals (interleaved, one row per path) in one atomic step,
    then remove the journals."""
    from chestxray.io import atomic_write

    summary = Summary()
    records = summary.see(interleave([iter_journal(j) for j in journals]), set())
    if fmt == "jsonl":
        atomic_write(out, lambda tmp: write_jsonl(tmp, records))
    elif fmt == "csv":
        atomic_write(out, lambda tmp: write_csv(tmp, records))
    elif fmt == "parquet":
        atomic_write(out, lambda tmp: write_parquet(tmp, records, labels))
    else:
        raise ChestXrayError(f"unknown streaming format {fmt!r}; choose one of {', '.join(STREAM_FORMATS)}")
    for j in journals:
        j.unlink(missing_ok=True)
    return summary


def complete_output_keys(out: Path, fmt: str) -> set[tuple[str, int, int]] | set[str]:
    """What a finished OUT holds: (path, size, mtime) keys for JSON Lines and Parquet; only
    paths for CSV (its columns stay those of `predict --format csv`). Paths as the outputs
    write them (`escape_name`). A file that does not read as such an output is refused."""
    try:
        if fmt == "jsonl":
            keys = {_checked_key(r) for r in iter_journal(out)}
            if None in keys:
                raise ValueError("not a result record")
            return keys  # type: ignore[return-value]
        if fmt == "parquet":
            table = _pyarrow().parquet.read_table(str(out), columns=["file", "size", "mtime_ns"])
            cols = table.to_pydict()
            return set(zip(cols["file"], cols["size"], cols["mtime_ns"]))
        with open(out, newline="", encoding="utf-8") as f:
            return {csv_uncell(row["file"]) for row in csv.DictReader(f)}
    except ChestXrayError:
        raise
    except Exception as exc:  # whatever the damage: json, csv, arrow, encoding or key errors
        raise ChestXrayError(
            f"{out}: cannot read this finished {fmt} output ({type(exc).__name__}); move it away or write to "
            "a new out=FILE"
        ) from None


class StdoutWriter:
    """CSV or JSON Lines to stdout, row by row as results arrive."""

    def __init__(self, fmt: str, stream: IO[str]) -> None:
        if fmt not in ("csv", "jsonl"):
            raise ChestXrayError(f"fmt={fmt!r} needs out=FILE")
        self.fmt, self.stream = fmt, stream
        self._csv = CsvOut(stream) if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(CSV_COLUMNS)

    def write(self, records: Sequence[Record]) -> None:
        buf = io.StringIO() if self._csv is None else None
        for rec in records:
            if self._csv is not None:
                self._csv.writerows(csv_rows(rec))
            else:
                assert buf is not None
                buf.write(json.dumps(public_record(rec)) + "\n")
        if buf is not None:
            self.stream.write(buf.getvalue())
        self.stream.flush()
