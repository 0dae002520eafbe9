"""Bulk predict: the streaming pipeline, resumable outputs, shards, torchrun merge.

Runs on the packaged int8 default.onnx (128 px, onnxruntime) over real NIH images, linked
many times into a temporary folder so that runs have several batches.
"""

from __future__ import annotations

import csv
import json
import operator
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chestxray.cli import main
from chestxray.inference.backend import Backend

pytest.importorskip("onnxruntime")

SRC = Path(__file__).resolve().parents[1] / "src"
ONNX = ["--backend", "onnx"]


def link_folder(folder: Path, sources: list[Path], copies: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(copies):
        for src in sources:
            dst = folder / f"c{k:03d}_{src.name}"
            dst.symlink_to(src.resolve())
            out.append(dst)
    return sorted(out)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pipeline_in_order_and_equal_to_the_serial_path(sample_images, tmp_path):
    """Worker processes, several batches, results in input order and the same numbers."""
    from chestxray.inference.inputs import iter_inputs
    from chestxray.inference.predict import Analyzer

    files = link_folder(tmp_path / "f", sample_images, 2)
    analyzer = Analyzer.load(backend="onnx", batch_size=3)
    serial = analyzer.predict([str(f) for f in files])
    bulk = [p for _, p in analyzer.predict_files(iter_inputs([tmp_path / "f"]), workers=2, batch_size=3)]
    assert [p.file for p in bulk] == [str(f) for f in files]
    listed = analyzer.predict_many([str(f) for f in files], workers=2)  # the list API, same pipeline
    assert [p.to_dict() for p in listed] == [p.to_dict() for p in bulk]
    assert bulk[0].variant == "onnx int8"
    in_process = [p for _, p in analyzer.predict_files(iter_inputs([tmp_path / "f"]), workers=0)]
    assert [p.to_dict() for p in in_process] == [p.to_dict() for p in bulk]
    for a, b in zip(serial, bulk):
        assert [(f.finding, f.positive) for f in a.findings] == [(f.finding, f.positive) for f in b.findings]
        assert [f.probability for f in a.findings] == pytest.approx([f.probability for f in b.findings], abs=1e-6)


def test_broken_files_among_good_ones_give_error_rows_and_exit_1(capsys, sample_images, tmp_path):
    folder = tmp_path / "mixed"
    good = link_folder(folder, sample_images[:4], 2)
    (folder / "a_empty.png").write_bytes(b"")
    (folder / "b_text.png").write_text("not an image\n")
    (folder / "c_truncated.png").write_bytes(sample_images[0].read_bytes()[:500])
    out = tmp_path / "res.csv"
    code, stdout, err = run_cli(
        capsys,
        "predict",
        *ONNX,
        str(folder),
        "--workers",
        "2",
        "--batch-size",
        "2",
        "--format",
        "csv",
        "--out",
        str(out),
    )
    assert code == 1 and stdout == ""
    rows = list(csv.DictReader(out.open()))
    errors = {Path(r["file"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"a_empty.png", "b_text.png", "c_truncated.png"}
    assert errors["a_empty.png"] == "empty file" and "truncated" in errors["c_truncated.png"]
    assert {r["file"] for r in rows if not r["error"]} == {str(g) for g in good}
    assert len(rows) == 3 + 14 * len(good)
    assert "3 of 11 files could not be read" in err and "b_text.png" in err
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow
def test_kill_9_halfway_then_resume_equals_an_uninterrupted_run(capsys, original_png, rgba_png, tmp_path):
    originals = sorted(original_png.parent.glob("*.png"))  # 1024 px: slow enough to stop halfway
    folder = tmp_path / "archive"
    files = link_folder(folder, originals, 16)
    args = ["predict", *ONNX, str(folder), "--format", "jsonl", "--workers", "1", "--batch-size", "4", "--no-progress"]
    ref = tmp_path / "ref.jsonl"
    assert run_cli(capsys, *args, "--out", str(ref))[0] == 0
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.partial"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chestxray.cli", *args, "--out", str(out)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = journal.read_bytes().count(b"\n")
    assert not out.exists() and 8 <= done < len(files), "the run was not stopped halfway"
    # A torn last line, as a kill in the middle of a write leaves.
    with journal.open("ab") as f:
        f.write(b'{"file": "half a reco')
    code, _, err = run_cli(capsys, *args, "--out", str(out))
    assert code == 2 and "--resume" in err  # never silently overwritten
    code, _, err = run_cli(capsys, *args, "--out", str(out), "--resume")
    assert code == 0, err
    assert out.read_bytes() == ref.read_bytes()
    assert [r["file"] for r in jsonl(out)] == [str(f) for f in files]
    assert not journal.exists()
    # Resuming a finished output does no work; a new file in the folder is refused clearly.
    assert run_cli(capsys, *args, "--out", str(out), "--resume")[0] == 0
    (folder / "zzz.png").symlink_to(originals[0])
    code, _, err = run_cli(capsys, *args, "--out", str(out), "--resume")
    assert code == 2 and "1 listed files are not in it" in err


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_resume_skips_by_path_size_and_mtime(capsys, sample_images, tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    folder = tmp_path / "f"
    files = link_folder(folder, sample_images[:3], 3)
    base = ["predict", *ONNX, str(folder), "--format", fmt, "--workers", "0", "--batch-size", "2"]
    ref, out = tmp_path / f"ref.{fmt}", tmp_path / f"out.{fmt}"
    assert run_cli(capsys, *base, "--out", str(ref))[0] == 0
    # An interrupted run: the journal of the first 5 files (made by a run over those only).
    run_cli(
        capsys,
        "predict",
        *ONNX,
        *[str(f) for f in files[:5]],
        "--format",
        "jsonl",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "first.jsonl"),
    )
    lines = (tmp_path / "first.jsonl").read_text().splitlines(keepends=True)
    # The 3rd file changed since (another mtime): it must be predicted again, once.
    stale = json.loads(lines[2])
    stale["mtime_ns"] -= 10**9
    lines[2] = json.dumps(stale) + "\n"
    Path(str(out) + ".partial").write_text("".join(lines))
    code, _, err = run_cli(capsys, *base, "--out", str(out), "--resume")
    assert code == 0, err
    if fmt == "csv":
        got = list(csv.DictReader(out.open()))
        want = list(csv.DictReader(ref.open()))
        key = operator.itemgetter("file", "finding")
        assert sorted(got, key=key) == sorted(want, key=key)
        assert len({r["file"] for r in got}) == len(files)
    else:
        import pyarrow.parquet as pq

        got, want = pq.read_table(out).to_pylist(), pq.read_table(ref).to_pylist()
        assert sorted(got, key=lambda r: r["file"]) == sorted(want, key=lambda r: r["file"])
        assert len(got) == len(files) and set(want[0]) >= {"file", "size", "mtime_ns", "Effusion", "positives"}


def test_shards_split_the_listing(capsys, sample_images, tmp_path):
    files = link_folder(tmp_path / "f", sample_images[:5], 1)
    got = []
    for i in range(3):
        code, out, _ = run_cli(
            capsys, "predict", *ONNX, str(tmp_path / "f"), "--shard", f"{i}/3", "--format", "jsonl", "--workers", "0"
        )
        assert code == 0
        got.append([r["file"] for r in map(json.loads, out.splitlines())])
    assert got[0] == [str(files[0]), str(files[3])]
    assert sorted(f for part in got for f in part) == [str(f) for f in files]
    code, _, err = run_cli(capsys, "predict", *ONNX, str(tmp_path / "f"), "--shard", "3/3")
    assert code == 2 and "--shard" in err


def test_from_list_and_globs(capsys, sample_images, tmp_path):
    files = link_folder(tmp_path / "f", sample_images[:2], 2)  # c000_* then c001_*
    listing = tmp_path / "list.txt"
    listing.write_text(f"# one file\n{files[0]}\n")
    code, out, _ = run_cli(
        capsys, "predict", *ONNX, str(tmp_path / "f" / "c001_*.png"), "--from-list", str(listing), "--format", "jsonl"
    )
    assert code == 0
    assert [r["file"] for r in map(json.loads, out.splitlines())] == [str(f) for f in (files[2], files[3], files[0])]


@pytest.mark.slow
def test_two_torchrun_ranks_merge_every_file_exactly_once(capsys, sample_images, tmp_path):
    pytest.importorskip("torch")
    files = link_folder(tmp_path / "f", sample_images[:6], 2)
    (tmp_path / "f" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nno")
    listing = sorted([str(f) for f in files] + [str(tmp_path / "f" / "broken.png")])
    ref = tmp_path / "ref.jsonl"
    base = ["predict", *ONNX, str(tmp_path / "f"), "--format", "jsonl", "--workers", "0", "--batch-size", "2"]
    assert run_cli(capsys, *base, "--out", str(ref))[0] == 1
    out = tmp_path / "merged.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "chestxray.cli",
            *base,
            "--out",
            str(out),
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # the broken file: exit 1 from every rank
    rows = jsonl(out)
    assert [r["file"] for r in rows] == listing  # every file once, in the listing order
    assert out.read_text() == ref.read_text()  # the same as one process
    assert [r["file"] for r in rows if r["error"]] == [str(tmp_path / "f" / "broken.png")]
    assert not list(tmp_path.glob("merged.jsonl.part*"))
    assert proc.stderr.count("wrote 13 predictions") == 1  # rank 0 alone merges and reports


class CrashOn:
    """A stand-in Analyzer whose decoder process dies (like a segfault) on one file name."""

    name, batch_size, backend = "crash-test", 4, Backend()

    def preprocess(self, image, name=None):
        import numpy as np

        if "crash" in str(image):
            os._exit(1)
        return None, np.full((1, 4, 4), float(len(str(image))), np.float32)

    def run(self, batch):
        return batch.reshape(len(batch), -1)[:, :2], None


def test_a_worker_that_dies_costs_one_error_row(tmp_path):
    from chestxray.inference.inputs import InputFile
    from chestxray.inference.pipeline import CRASHED, iter_outputs

    files = [InputFile(str(tmp_path / f"{k:02d}{'crash' if k == 5 else ''}.png")) for k in range(10)]
    got = list(iter_outputs(CrashOn(), files, workers=2, batch_size=4))
    assert [f.path for f, *_ in got] == [f.path for f in files]
    assert [e for *_, e in got] == [CRASHED if k == 5 else None for k in range(10)]
    assert all(p[0] == len(f.path) for f, p, _, e in got if e is None)


def test_resume_refuses_a_journal_of_another_model(capsys, sample_images, tmp_path):
    out = tmp_path / "out.jsonl"
    rec = {
        "file": str(sample_images[0]),
        "size": 1,
        "mtime_ns": 1,
        "model": "some-other-model",
        "findings": [],
        "error": None,
    }
    Path(str(out) + ".partial").write_text(json.dumps(rec) + "\n")
    code, _, err = run_cli(
        capsys, "predict", *ONNX, str(sample_images[0]), "--format", "jsonl", "--out", str(out), "--resume"
    )
    assert code == 2 and "some-other-model" in err and not out.exists()
    code, _, err = run_cli(capsys, "predict", *ONNX, str(sample_images[0]), "--resume")
    assert code == 2 and "--resume needs --out" in err


class MeanModel(Backend):
    """A stand-in network (the pipeline's memory is under test, not the model's cost): one
    probability per label from the image's mean."""

    name = "mean"

    def __init__(self, labels: int) -> None:
        self.labels = labels

    def probabilities(self, batch):
        import numpy as np

        return np.repeat(batch.reshape(len(batch), -1).mean(axis=1, keepdims=True), self.labels, axis=1)


def test_main_process_memory_stays_flat_over_thousands_of_files(tmp_path):
    """No per-file state may pile up in the main process (listing, ordering, results): its
    Python allocations grow by far less than the ~0.7 KB per file that a cached stat result
    per listed symlink used to add. 8-px model inputs keep the batches in flight small."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    from chestxray.data.transforms import Preprocessing
    from chestxray.inference.inputs import iter_inputs
    from chestxray.inference.outputs import to_record
    from chestxray.inference.predict import Analyzer

    src = tmp_path / "one.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(src)
    folder = tmp_path / "many"
    folder.mkdir()
    n = 3000
    for k in range(n):
        os.symlink(src, folder / f"{k:05d}.png")
    labels = [f"finding{i}" for i in range(14)]
    analyzer = Analyzer(MeanModel(len(labels)), labels, [0.5] * len(labels), Preprocessing(size=8), "mean")
    tracemalloc.start()
    try:
        ok = 0
        for k, (f, p) in enumerate(analyzer.predict_files(iter_inputs([folder]), workers=2, batch_size=32), 1):
            to_record(f, p)
            ok += p.ok
            if k == n // 3:
                first = tracemalloc.get_traced_memory()[0]
            if k == n - 300:  # still mid-run: the listing and the pool are live
                growth = tracemalloc.get_traced_memory()[0] - first
    finally:
        tracemalloc.stop()
    assert ok == n
    assert growth / (n - 300 - n // 3) < 100, f"{growth} bytes more for {n - 300 - n // 3} files"


STDIN_SCRIPT = """
import multiprocessing, sys
from chestxray.inference.inputs import iter_inputs
from chestxray.inference.predict import Analyzer

files = sys.argv[1:]
analyzer = Analyzer.load(backend="onnx", batch_size=2)
decoders = set()
for f, p in analyzer.predict_files(iter_inputs(files), workers=2):
    decoders |= {c.pid for c in multiprocessing.active_children() if "forkserver" not in (c.name or "")}
    print(p.file, p.ok, p.error)
listed = analyzer.predict_many(files, workers=2)
print("decoders", len(decoders), "listed ok", sum(p.ok for p in listed))
"""


def test_worker_pool_from_a_script_piped_to_python_stdin(sample_images):
    """`python - < script.py`: __main__ has no file for the decoder processes to re-run."""
    files = [str(f) for f in sample_images[:6]]
    proc = subprocess.run(
        [sys.executable, "-", *files], input=STDIN_SCRIPT, env=env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[:-1] == [f"{f} True None" for f in files]
    assert lines[-1] == "decoders 2 listed ok 6"


def test_dataset_roots_are_inputs(capsys, mini_root, tmp_path):
    """--dataset ROOT [--split]: a root as evaluate takes it (NIH path or NAME:PATH), its images
    listed from the index in its order, each row naming the file."""
    test_names = set(mini_root.joinpath("test_list.txt").read_text().split())
    out = tmp_path / "nih.jsonl"
    code, _, err = run_cli(
        capsys,
        "predict",
        *ONNX,
        "--dataset",
        str(mini_root),
        "--split",
        "test",
        "--workers",
        "2",
        "--format",
        "jsonl",
        "--out",
        str(out),
    )
    assert code == 0, err
    rows = jsonl(out)
    assert {Path(r["file"]).name for r in rows} == test_names and len(rows) == len(test_names)
    assert all(Path(r["file"]).is_file() and r["findings"] and not r["error"] for r in rows)

    chexpert = mini_root.parent / "chexpert-mini"
    with open(chexpert / "CheXpert-v1.0-small" / "valid.csv", newline="") as f:
        frontal = [str(chexpert / r["Path"]) for r in csv.DictReader(f) if r["Frontal/Lateral"] == "Frontal"]
    code, stdout, _ = run_cli(
        capsys,
        "predict",
        *ONNX,
        "--dataset",
        f"chexpert:{chexpert}",
        "--split",
        "val",
        "--format",
        "jsonl",
        "--no-progress",
    )
    assert code == 0
    assert [json.loads(line)["file"] for line in stdout.splitlines()] == frontal  # valid.csv's order

    code, _, err = run_cli(capsys, "predict", *ONNX, "--dataset", f"chexpert:{tmp_path / 'nowhere'}")
    assert code == 2 and "dataset root not found" in err
    code, _, err = run_cli(capsys, "predict", *ONNX, str(mini_root / "images"), "--split", "val")
    assert code == 2 and "--split only applies with --dataset" in err


def _pb(field: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (enough to write an ONNX file's metadata by hand)."""
    n, size = len(data), b""
    while True:
        size += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return bytes([field << 3 | 2]) + size + data


def test_onnx_metadata_read_without_a_session_and_a_late_load_error(capsys, sample_images, tmp_path):
    """Bulk predict starts its decoders on the metadata alone while the session loads: the
    metadata equal onnxruntime's, and a file whose graph cannot load still fails with one
    line and leaves no partial output behind."""
    from chestxray.inference.onnx_backend import default_onnx_path, ort_session, read_onnx_props

    props = read_onnx_props(default_onnx_path())
    assert props == dict(ort_session(default_onnx_path()).get_modelmeta().custom_metadata_map)
    assert read_onnx_props(sample_images[0]) is None  # not protobuf: the session path decides

    broken = tmp_path / "nograph.onnx"  # chestxray's metadata, no graph
    broken.write_bytes(
        bytes([8, 7]) + b"".join(_pb(14, _pb(1, k.encode()) + _pb(2, v.encode())) for k, v in props.items())
    )
    assert read_onnx_props(broken) == props
    link_folder(tmp_path / "f", sample_images, 6)
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(
        capsys,
        "predict",
        *ONNX,
        "--model",
        str(broken),
        str(tmp_path / "f"),
        "--workers",
        "2",
        "--format",
        "jsonl",
        "--out",
        str(out),
    )
    assert code == 2 and "onnxruntime cannot load this file" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("out.jsonl*"))


class FirstTwo(Backend):
    """A picklable CPU backend with a worker recipe: workers rebuild it and infer themselves."""

    name = "first-two"

    def worker_recipe(self):
        return FirstTwo

    def probabilities(self, batch):
        return batch.reshape(len(batch), -1)[:, :2]


class CrashOnInfer(CrashOn):
    backend = FirstTwo()


def test_workers_that_infer_keep_order_and_a_crash_costs_one_row(tmp_path, monkeypatch):
    """When the backend can be rebuilt in the workers (ONNX on CPU), they decode and infer;
    order, error rows and a dying worker behave as when this process infers."""
    from chestxray.inference.inputs import InputFile
    from chestxray.inference.pipeline import CRASHED, DecodePool, iter_outputs

    assert DecodePool(CrashOnInfer(), 2, infer=True).infers
    assert not DecodePool(CrashOnInfer(), 0, infer=True).infers and not DecodePool(CrashOn(), 2, infer=True).infers
    files = [InputFile(str(tmp_path / f"{k:02d}{'crash' if k == 5 else ''}.png")) for k in range(10)]
    # 3 workers on 3 cores: they infer (with fewer than 3, or fewer than the cores, this process does)
    monkeypatch.setattr("chestxray.inference.pipeline.default_workers", lambda *a: 3)
    got = list(iter_outputs(CrashOnInfer(), files, workers=3, batch_size=4))
    assert [f.path for f, *_ in got] == [f.path for f in files]
    assert [e for *_, e in got] == [CRASHED if k == 5 else None for k in range(10)]
    assert all(p[0] == len(f.path) and s is None for f, p, s, e in got if e is None)


def test_onnx_workers_infer_and_match_this_process(sample_images, tmp_path, monkeypatch):
    from chestxray.inference.inputs import InputFile
    from chestxray.inference.pipeline import DecodePool, iter_outputs
    from chestxray.inference.predict import Analyzer

    analyzer = Analyzer.load(backend="onnx", batch_size=4, threads=1)
    assert DecodePool(analyzer, 2, infer=True).infers
    files = [InputFile.of(str(f)) for f in link_folder(tmp_path / "f", sample_images[:5], 2)]
    here = list(iter_outputs(analyzer, files, workers=0))
    monkeypatch.setattr("chestxray.inference.pipeline.default_workers", lambda *a: 3)
    there = list(iter_outputs(analyzer, files, workers=3))  # 3 of 3 cores: they infer
    assert [f.path for f, *_ in there] == [f.path for f, *_ in here]
    for (_, p, s, _), (_, q, t, _) in zip(here, there):
        assert s is not None and p == pytest.approx(q, abs=1e-6) and s == pytest.approx(t, rel=1e-5)


def test_who_infers_depends_on_the_workers_and_cores(monkeypatch):
    """ONNX on CPU: the workers infer when they have every core and are at least 3; on 2 cores
    or with spare cores this process infers while they decode."""
    from chestxray.inference import pipeline

    for cores, workers, expect in ((2, 2, False), (2, 1, False), (16, 16, True), (16, 8, False), (3, 3, True)):
        monkeypatch.setattr(pipeline, "default_workers", lambda *a, c=cores: c)
        assert pipeline.workers_infer(workers, gpu=False) is expect, (cores, workers)
    assert not pipeline.workers_infer(16, gpu=True)  # CUDA: this process drives the GPU


def test_a_kept_pool_serves_many_calls_with_the_same_processes(sample_images, tmp_path):
    """`open_pool`: decoder processes start once and serve every `predict_files(pool=...)`
    call (a listener's small batches), with the same findings as decoding in this process."""
    from chestxray.inference.inputs import InputFile
    from chestxray.inference.predict import Analyzer

    def children(pid: int) -> set[int]:
        path = Path(f"/proc/{pid}/task/{pid}/children")
        if not path.exists():
            pytest.skip("needs Linux /proc to see the worker processes")
        return {int(c) for c in path.read_text().split()}

    def decoders() -> set[int]:  # the fork server's children: the pool's worker processes
        return set().union(*(children(c) for c in children(os.getpid())))

    analyzer = Analyzer.load(backend="onnx", batch_size=4)
    files = [InputFile.of(str(f)) for f in link_folder(tmp_path / "f", sample_images[:3], 2)]
    before = decoders()  # grandchildren already there (another test's browser, say)
    with analyzer.open_pool(workers=1) as pool:
        first = [p for _, p in analyzer.predict_files(files[:3], pool=pool)]
        kept = decoders() - before
        second = [p for _, p in analyzer.predict_files(files[3:], pool=pool)]
        assert kept and decoders() - before == kept  # alive between calls; none started or replaced
    here = [p for _, p in analyzer.predict_files(files, workers=0)]
    assert [p.file for p in first + second] == [p.file for p in here]
    for a, b in zip(first + second, here, strict=True):
        assert [f.probability for f in a.findings] == pytest.approx([f.probability for f in b.findings], abs=1e-6)
