"""Bulk predict against hostile inputs and places: another run's journal, formula and
control characters in names, names that are not UTF-8, odd files (loops, FIFOs, devices,
huge files), unwritable outputs, damaged outputs and journals, pipes as lists.

Runs on the packaged int8 default.onnx over the NIH samples; every test stays small.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import time
from pathlib import Path

import pytest

from chestxray.cli import main

pytest.importorskip("onnxruntime")

ONNX = ["--backend", "onnx", "--no-progress"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def linked(folder: Path, source: Path, names: list[str | bytes]) -> list[str]:
    """Symlinks to `source` under `folder` with these names (bytes: not UTF-8)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        target = os.path.join(os.fsencode(folder), os.fsencode(name))
        os.symlink(os.fsencode(source.resolve()), target)
        out.append(os.fsdecode(target))
    return out


def interrupt_after_first_batch(monkeypatch) -> None:
    """The next run stops (as ^C would) after its first journaled batch."""
    from chestxray.inference.outputs import Journal

    real = Journal.append
    calls = {"n": 0}

    def append(self, records):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        real(self, records)

    monkeypatch.setattr(Journal, "append", append)


# ---- resume ----------------------------------------------------------------------------


def test_resume_refuses_a_journal_of_other_inputs_or_another_shard(capsys, sample_images, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        for k, src in enumerate(sample_images[:4]):
            linked(folder, src, [f"{folder.name}{k}.png"])
    out = tmp_path / "y.jsonl"
    journal = Path(str(out) + ".partial")
    args = ["predict", *ONNX, "--workers", "0", "--batch-size", "2", "--format", "jsonl", "--out", str(out)]
    with monkeypatch.context() as m:
        interrupt_after_first_batch(m)
        assert run_cli(capsys, *args, str(one))[0] == 130
    kept = journal.read_bytes()
    assert kept.count(b"\n") >= 2
    code, _, err = run_cli(capsys, *args, str(two), "--resume")
    assert code == 2 and "another run" in err and "paths" in err and str(two) in err
    assert len(err.strip().splitlines()) == 1 and journal.read_bytes() == kept and not out.exists()
    code, _, err = run_cli(capsys, *args, str(one), "--shard", "0/2", "--resume")
    assert code == 2 and "shard" in err and "0/1" in err and journal.read_bytes() == kept
    code, _, err = run_cli(capsys, *args, str(one), "--force")
    assert code == 2 and "--force only applies with --resume" in err
    # --force: the journal's results of files not listed now are dropped, and said so.
    code, _, err = run_cli(capsys, *args, str(two), "--resume", "--force")
    assert code == 0, err
    assert "dropped 2 results" in err
    assert [Path(json.loads(line)["file"]).name for line in out.read_text().splitlines()] == [
        f"two{k}.png" for k in range(4)
    ]


def test_resume_of_the_same_inputs_still_continues(capsys, sample_images, tmp_path, monkeypatch):
    for k, src in enumerate(sample_images[:4]):
        linked(tmp_path / "f", src, [f"{k}.png"])
    out = tmp_path / "y.csv"
    args = [
        "predict",
        *ONNX,
        str(tmp_path / "f"),
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--format",
        "csv",
        "--out",
        str(out),
    ]
    with monkeypatch.context() as m:
        interrupt_after_first_batch(m)
        assert run_cli(capsys, *args)[0] == 130
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert len({r["file"] for r in csv.DictReader(out.open())}) == 4


def test_damaged_outputs_and_journals_on_resume_are_one_line_errors(capsys, sample_images, tmp_path):
    pytest.importorskip("pyarrow")
    image = str(sample_images[0])
    for fmt, junk in (("jsonl", b'{"file": 3}\n'), ("parquet", b"PAR1 not really"), ("csv", b"\xff\xfe\x00junk\n")):
        out = tmp_path / f"done.{fmt}"
        out.write_bytes(junk)
        code, _, err = run_cli(capsys, "predict", *ONNX, image, "--format", fmt, "--out", str(out), "--resume")
        assert code == 2 and "cannot read this finished" in err and len(err.strip().splitlines()) == 1, err
        assert out.read_bytes() == junk
    # A journal line of the wrong shape (valid JSON, not a record) is refused, not trusted.
    out = tmp_path / "j.jsonl"
    journal = Path(str(out) + ".partial")
    journal.write_text('[1, 2]\n{"file": "x.png", "size": 1, "mtime_ns": 1, "model": "m"}\n')
    code, _, err = run_cli(capsys, "predict", *ONNX, image, "--format", "jsonl", "--out", str(out), "--resume")
    assert code == 2 and "line 1 is not a result record" in err
    assert journal.read_text().startswith("[1, 2]\n")


def test_journal_records_with_fields_of_the_wrong_type_are_refused(capsys, sample_images, tmp_path):
    """A record whose key is right but whose fields are not what the outputs read (found by
    benchmarks/hostile_corpus.py): one line naming the journal, which stays as it was."""
    pytest.importorskip("pyarrow")
    image = sample_images[0]
    ref = tmp_path / "ref.jsonl"
    assert run_cli(capsys, "predict", *ONNX, str(image), "--format", "jsonl", "--out", str(ref))[0] == 0
    good = json.loads(ref.read_text())
    wrong = {
        "size 1e400": {**good, "size": 1e400},
        "findings a number": {**good, "findings": 5},
        "no probability": {**good, "findings": [{"finding": "Mass"}]},
        "probability a string": {**good, "findings": [{**good["findings"][0], "probability": "x"}]},
        "warnings a number": {**good, "warnings": 7},
        "error a list": {**good, "error": [1]},
    }
    for fmt in ("jsonl", "csv", "parquet"):
        for what, rec in wrong.items():
            out = tmp_path / f"{what.replace(' ', '-')}.{fmt}"
            journal = Path(str(out) + ".partial")
            journal.write_text(json.dumps(rec) + "\n")
            code, _, err = run_cli(capsys, "predict", *ONNX, str(image), "--format", fmt, "--out", str(out), "--resume")
            assert code == 2 and err.strip() == (
                f"chestxray predict: error: {journal}: line 1 is not a result record; move the journal away to start "
                "over"
            ), (fmt, what, err)
            assert journal.read_text() == json.dumps(rec) + "\n" and not out.exists(), (fmt, what)


# ---- names: formulas, CR, not UTF-8, control characters ---------------------------------


def test_csv_defuses_formulas_and_quotes_carriage_returns(capsys, sample_images, tmp_path, monkeypatch):
    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM(1).png", "\tt.png", "\rr.png", "a\rb.png", "'q.png"]
    linked(tmp_path, sample_images[0], names)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res.csv"
    code, _, err = run_cli(capsys, "predict", *ONNX, "--format", "csv", "--out", str(out), "--", *names)
    assert code == 0, err
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14 * len(names)  # a CR splits no row
    cells = list(dict.fromkeys(r["file"] for r in rows))
    assert cells == ["'" + n if n[0] in "=+-@\t\r'" else n for n in names]
    assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in cells)
    # Standard output too; JSON Lines keeps the names as they are.
    code, text, _ = run_cli(capsys, "predict", *ONNX, "--format", "csv", "--", *names)
    assert code == 0 and list(dict.fromkeys(r["file"] for r in csv.DictReader(text.splitlines(True)))) == cells
    code, text, _ = run_cli(capsys, "predict", *ONNX, "--format", "jsonl", "--", *names)
    assert [json.loads(line)["file"] for line in text.splitlines()] == names


def test_names_that_are_not_utf8_in_every_format_and_on_resume(capsys, sample_images, tmp_path):
    pytest.importorskip("pyarrow")
    import codecs

    import pyarrow.parquet as pq

    folder = tmp_path / "f"
    bad = linked(folder, sample_images[0], [b"caf\xe9 \\ x.png"])[0]
    linked(folder, sample_images[1], ["ok.png"])
    escaped = str(folder) + "/caf\\xe9 \\\\ x.png"
    assert codecs.escape_decode(escaped.encode())[0] == os.fsencode(bad)  # documented: lossless
    for fmt in ("csv", "jsonl", "parquet"):
        out = tmp_path / f"res.{fmt}"
        args = ["predict", *ONNX, str(folder), "--format", fmt, "--out", str(out)]
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
        if fmt == "csv":
            files = [r["file"] for r in csv.DictReader(out.open(encoding="utf-8"))][::14]
        elif fmt == "jsonl":
            files = [json.loads(line)["file"] for line in out.read_text(encoding="utf-8").splitlines()]
        else:
            files = pq.read_table(out).column("file").to_pylist()
        assert files == [escaped, str(folder / "ok.png")]
        code, _, err = run_cli(capsys, *args, "--resume")
        assert code == 0 and "already complete" in err, err
    # --from-list with the raw bytes of that name.
    listing = tmp_path / "list.txt"
    listing.write_bytes(os.fsencode(bad) + b"\n")
    code, out, err = run_cli(capsys, "predict", *ONNX, "--from-list", str(listing), "--format", "json")
    assert code == 0, err
    assert [r["file"] for r in json.loads(out)] == [escaped] and json.loads(out)[0]["error"] is None


def test_table_and_failure_list_escape_control_and_bidi_characters(capsys, sample_images, tmp_path):
    good = linked(tmp_path, sample_images[0], ["ok\x1b[2Jx\u202egnp.png"])[0]
    broken = tmp_path / "bad\x1b]0;title\x07\u2066.png"
    broken.write_bytes(b"not an image")
    code, out, err = run_cli(capsys, "predict", *ONNX, good, str(broken))
    assert code == 1
    for text in (out, err):
        assert "\x1b" not in text and "\u202e" not in text and "\u2066" not in text and "\x07" not in text
    assert "ok\\x1b[2Jx\\u202egnp.png" in out and "bad\\x1b]0;title\\x07\\u2066.png" in err


# ---- odd files ---------------------------------------------------------------------------


def test_a_symlink_loop_lists_each_folder_once(capsys, sample_images, tmp_path):
    from chestxray.inference.predict import collect_inputs

    root = tmp_path / "root"
    linked(root / "sub", sample_images[0], ["a.png"])
    (root / "sub" / "up").symlink_to(root)  # loops back
    (root / "self").symlink_to(root / "self")  # a link to itself
    other = tmp_path / "other"
    linked(other, sample_images[1], ["b.png"])
    (root / "linked").symlink_to(other)  # a linked folder is followed
    code, out, err = run_cli(capsys, "predict", *ONNX, str(root), "--format", "json")
    assert code == 0, err
    assert [r["file"] for r in json.loads(out)] == [str(root / "linked" / "b.png"), str(root / "sub" / "a.png")]
    # One walker: the export's image collection lists the same files.
    assert collect_inputs([root]) == [root / "linked" / "b.png", root / "sub" / "a.png"]


def test_fifos_and_devices_are_error_rows_never_a_hang(capsys, sample_images, tmp_path):
    from chestxray.data.images import read_image
    from chestxray.errors import ImageReadError

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{fifo}\n{sample_images[0]}\n")
    start = time.monotonic()
    code, out, err = run_cli(
        capsys, "predict", *ONNX, str(fifo), "--from-list", str(listing), "--format", "json", "--workers", "0"
    )
    assert code == 1 and time.monotonic() - start < 60, err
    rows = json.loads(out)
    assert [r["error"] for r in rows] == ["not a regular file (a pipe, socket or device)"] * 2 + [None]
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image("/dev/zero")  # the one reader: datasets (prepare) and the server use it too
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(fifo)


def test_size_cap_and_magic_bytes_are_checked_before_reading(capsys, sample_images, tmp_path):
    import tracemalloc

    from chestxray.data.images import DecodeLimits, read_image
    from chestxray.errors import ImageReadError

    big = tmp_path / "big.png"
    with big.open("wb") as f:  # sparse: 600 MB on paper, nothing on disk
        f.truncate(600 * 2**20)
    tracemalloc.start()
    with pytest.raises(ImageReadError, match="over the 512 MiB file size limit"):
        read_image(big)
    with pytest.raises(ImageReadError, match="not a PNG, JPEG or DICOM"):
        read_image(big, limits=DecodeLimits(max_file_bytes=None))  # no cap: the first bytes decide
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20
    code, out, err = run_cli(
        capsys, "predict", *ONNX, str(sample_images[0]), "--format", "json", "--max-file-mb", "0.01"
    )
    assert code == 1 and "file size limit" in json.loads(out)[0]["error"], err
    code, out, _ = run_cli(capsys, "predict", *ONNX, str(sample_images[0]), "--format", "json", "--max-file-mb", "0")
    assert code == 0 and json.loads(out)[0]["error"] is None


def test_a_nul_byte_in_the_list_is_an_error_row(capsys, sample_images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a\x00b.png\n" + os.fsencode(sample_images[0]) + b"\n")
    code, _, err = run_cli(
        capsys, "predict", *ONNX, "--from-list", str(listing), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")
    )
    assert code == 1, err
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[0]["file"] == "a\\x00b.png" and "NUL" in rows[0]["error"] and rows[1]["error"] is None


def test_from_list_reads_a_pipe(capsys, sample_images, tmp_path):
    r, w = os.pipe()
    os.write(w, b"".join(os.fsencode(p) + b"\n" for p in sample_images[:2]))
    os.close(w)
    try:
        code, out, err = run_cli(capsys, "predict", *ONNX, "--from-list", f"/dev/fd/{r}", "--format", "json")
    finally:
        os.close(r)
    assert code == 0, err
    assert [x["file"] for x in json.loads(out)] == [str(p) for p in sample_images[:2]]


# ---- outputs that cannot be written ------------------------------------------------------


def test_out_is_checked_before_any_work(capsys, sample_images, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(sample_images[0].read_bytes())
    before = image.read_bytes()
    cases = {
        str(tmp_path): "is a folder",
        str(image): "would overwrite an image",
        "/proc/chestxray-no/out.jsonl": "cannot write here",
    }
    for out, reason in cases.items():
        for fmt in ("jsonl", "json"):
            code, _, err = run_cli(capsys, "predict", *ONNX, str(image), "--format", fmt, "--out", out)
            assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, (out, err)
    renamed = tmp_path / "radiograph"  # an image by content, whatever its name
    image.rename(renamed)
    code, _, err = run_cli(capsys, "predict", *ONNX, str(renamed), "--format", "csv", "--out", str(renamed))
    assert code == 2 and "is an image" in err and renamed.read_bytes() == before


def test_a_full_disk_keeps_the_journaled_results(capsys, sample_images, tmp_path, monkeypatch):
    from chestxray.inference.outputs import Journal

    real = Journal.append
    calls = {"n": 0}

    def append(self, records):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, records)

    monkeypatch.setattr(Journal, "append", append)
    out = tmp_path / "o.jsonl"
    code, _, err = run_cli(
        capsys,
        "predict",
        *ONNX,
        *map(str, sample_images[:4]),
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--format",
        "jsonl",
        "--out",
        str(out),
    )
    assert code == 2 and "No space left on device" in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1
    journal = Path(str(out) + ".partial").read_text().splitlines()
    assert len(journal) == 3  # the header and the first batch


def test_cam_with_a_long_input_name(capsys, tiny_bundle, sample_images, tmp_path):
    name = "n" * 247 + ".png"  # 251 characters
    linked(tmp_path, sample_images[0], [name])
    cams = tmp_path / "cams"
    code, out, err = run_cli(
        capsys,
        "predict",
        "--model",
        str(tiny_bundle),
        str(tmp_path / name),
        "--cam",
        str(cams),
        "--format",
        "json",
        "--no-progress",
    )
    assert code == 0, err
    overlays = json.loads(out)[0]["overlays"]
    assert overlays and all(Path(o["path"]).is_file() and len(Path(o["path"]).name) <= 255 for o in overlays)


def test_export_checks_its_output_before_exporting(capsys, tiny_bundle, monkeypatch):
    import chestxray.export.onnx as ox

    exports = []
    monkeypatch.setattr(ox, "export_bundle", lambda *a, **k: exports.append(a))
    code, _, err = run_cli(capsys, "export", "--model", str(tiny_bundle), "--onnx", "/proc/chestxray-no/m.onnx")
    assert code == 2 and "cannot write here" in err and len(err.strip().splitlines()) == 1
    assert exports == []  # refused before the export, not after it


# ---- the core ----------------------------------------------------------------------------


def test_the_background_onnx_build_ends_before_the_run_returns(tmp_path, monkeypatch):
    """A process that exits while onnxruntime builds a session in a thread aborts (134)."""
    from chestxray.inference import onnx_backend
    from chestxray.inference.predict import Analyzer

    real = onnx_backend.OnnxBackend.__init__

    def slow(self, *args, **kwargs):
        time.sleep(0.5)
        real(self, *args, **kwargs)

    monkeypatch.setattr(onnx_backend.OnnxBackend, "__init__", slow)
    (tmp_path / "a.png").write_bytes(b"not an image")
    analyzer = Analyzer.load(backend="onnx", background=True)
    from chestxray.inference.inputs import iter_inputs

    rows = list(analyzer.predict_files(iter_inputs([tmp_path]), workers=0))
    assert [p.error for _, p in rows] == ["not a PNG, JPEG or DICOM image"]
    thread = analyzer.backend._thread
    assert thread is not None and not thread.is_alive()


def test_bulk_request_runs_without_the_command(sample_images, tmp_path):
    from chestxray.inference.bulk import BulkRequest, run
    from chestxray.inference.predict import Analyzer

    analyzer = Analyzer.load(backend="onnx")
    files = [str(p) for p in sample_images[:3]]
    result = run(BulkRequest(paths=files, fmt="json", workers=0, progress=False), analyzer)
    assert [p.file for p in result.predictions] == files and result.errors == 0
    out = tmp_path / "o.jsonl"
    result = run(BulkRequest(paths=files, fmt="jsonl", out=out, workers=0, progress=False), analyzer)
    assert result.wrote == out and result.total == 3 and len(out.read_text().splitlines()) == 3
    with pytest.raises(Exception, match="resume"):
        BulkRequest(paths=files, resume=True)


def test_a_failed_write_of_a_finished_table_keeps_the_results(capsys, sample_images, tmp_path, monkeypatch):
    import chestxray.io

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(chestxray.io, "atomic_write_text", full)
    code, out, err = run_cli(
        capsys, "predict", *ONNX, str(sample_images[0]), "--format", "json", "--out", str(tmp_path / "o.json")
    )
    assert code == 2 and "No space left on device" in err and "stdout" in err
    assert [r["file"] for r in json.loads(out)] == [str(sample_images[0])]
