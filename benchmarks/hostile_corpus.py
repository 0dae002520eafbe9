"""The hostile-input corpus of the quality pass, through the real CLI: each hostile input of
its items 1-18 is built in a temporary folder and every command that met it is run as a
subprocess with a timeout. Per case: the exit status, whether a traceback (or a crash by
signal, e.g. exit 134) reached the user, whether it hung past its timeout, the peak RSS of
the command's own process (VmHWM, polled), and a check of the outcome: for bulk runs, that every good file
still has a result row; for refusals, that the refusal is one line and nothing was lost.

The server's hostile clients (header bombs, slow bodies, metrics cardinality) are covered by
benchmarks/serve_load.py and tests/test_serve_hostile.py and are not repeated here; the
serve flags of item 18 are (a serve that accepts a bad flag shows up as a hang).

    python benchmarks/hostile_corpus.py                 # all cases, 2 at a time
    python benchmarks/hostile_corpus.py --only resume,odd_files --keep --json out.json
    python benchmarks/hostile_corpus.py --src /path/to/other/checkout/src   # the same corpus, older code

Predictions use the packaged ONNX model (`--backend onnx`) on small NIH images from
tests/data; training cases use resnet18 at 32 px for one step. Nothing large is written: the
1.5 GB file is sparse. Exit status 1 when any case has a traceback, a crash, a hang or a
failed check.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
NIH = DATA / "nih-mini"
IMAGES = sorted((NIH / "images").glob("*.png"))
ONNX = REPO / "src" / "chestxray" / "weights" / "default.onnx"
CLI = [sys.executable, "-m", "chestxray.cli"]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    "OMP_NUM_THREADS": "1",  # the corpus checks behaviour, not speed; stay light on shared cores
    "NO_COLOR": "1",
}
P = ["predict", "--backend", "onnx", "--no-progress", "--workers", "0"]
# A 'billion laughs': 9 levels of 9 aliases, a few hundred bytes that expand to 9**9 items.
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
) + "lr: *i\n"



@dataclass
class Step:
    argv: list[str]
    rc: int
    seconds: float
    rss_mb: float
    out: str
    err: str
    hung: bool

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.out + self.err

    @property
    def crashed(self) -> bool:  # killed by a signal or an abort (134), not by our timeout
        return not self.hung and (self.rc < 0 or self.rc >= 128)


@dataclass
class Case:
    item: int
    name: str
    steps: list[Step] = field(default_factory=list)
    problem: str = ""

    @property
    def bad(self) -> bool:
        return bool(self.problem) or any(s.traceback or s.hung or s.crashed for s in self.steps)


def _vmhwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def run(argv: list[str], *, timeout: float = 60, cwd: Path | None = None, shell: bool = False) -> Step:
    """One command in its own session (so a timeout kills its workers too), with its own peak RSS."""
    cmd = ["bash", "-c", argv[0]] if shell else [*CLI, *argv]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=ENV, cwd=cwd,
                                start_new_session=True)
        hung = False
        peak_kb = 0
        while True:
            # VmHWM, not wait4's ru_maxrss: Linux carries the forked parent's RSS (this script's)
            # over the exec into ru_maxrss. Polled, so growth in the last 20 ms may be missed.
            peak_kb = max(peak_kb, _vmhwm_kb(proc.pid))
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                hung = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, _ = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        if not hung:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # workers it left behind
            except ProcessLookupError:
                pass
        secs = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        return Step(argv if not shell else ["bash", "-c", argv[0]], rc, secs, peak_kb / 1024,
                    out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"), hung)


# ---- reading outputs back -------------------------------------------------------------------


def rows_of(path: Path, fmt: str) -> dict[str, bool]:
    """file name as written -> True when it has probabilities (False: an error row)."""
    if fmt == "jsonl":
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {r["file"]: bool(r.get("findings")) and not r.get("error") for r in recs}
    if fmt == "json":
        recs = json.loads(path.read_text(encoding="utf-8"))
        recs = recs if isinstance(recs, list) else recs.get("predictions", [])
        return {r["file"]: bool(r.get("findings")) and not r.get("error") for r in recs}
    if fmt == "csv":
        seen: dict[str, bool] = {}
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                seen[row["file"]] = seen.get(row["file"], False) or bool(row["probability"])
        return seen
    if fmt == "parquet":
        import pyarrow.parquet as pq

        cols = pq.read_table(str(path)).to_pydict()
        return {name: err is None for name, err in zip(cols["file"], cols["error"])}
    raise ValueError(fmt)


def expect_good(path: Path, fmt: str, n_good: int, n_total: int | None = None) -> str:
    if not path.is_file():
        return f"no output {path.name}"
    try:
        rows = rows_of(path, fmt)
    except Exception as exc:  # the check reports whatever went wrong reading it
        return f"output unreadable: {type(exc).__name__}: {exc}"
    good = sum(rows.values())
    if good != n_good:
        return f"{good} good rows, expected {n_good} (lost results)"
    if n_total is not None and len(rows) != n_total:
        return f"{len(rows)} rows, expected {n_total}"
    return ""


def one_line(step: Step, rc: int | tuple[int, ...] = 2, needle: str = "") -> str:
    rcs = (rc,) if isinstance(rc, int) else rc
    lines = [line for line in step.err.strip().splitlines() if line.strip()]
    if lines and (": error: argument " in lines[-1] or ": error: the following arguments" in lines[-1]):
        lines = lines[-1:]  # argparse's usage block, then its one error line: the convention
    if step.rc not in rcs:
        return f"exit {step.rc}, expected {rcs}: {step.err.strip()[-300:]}"
    if len(lines) != 1 and 2 in rcs and step.rc == 2:
        return f"{len(lines)} lines on stderr, expected one: {step.err.strip()[-300:]}"
    if needle and needle not in step.err:
        return f"stderr lacks {needle!r}: {step.err.strip()[-300:]}"
    return ""


def copies(folder: Path, names: list[str | bytes], sources: list[Path] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name, src in zip(names, sources or IMAGES):
        raw = os.fsencode(folder) + b"/" + (name if isinstance(name, bytes) else name.encode())
        shutil.copyfile(src, raw)
        made.append(Path(os.fsdecode(raw)))
    return made


def garbage(path: Path, data: bytes = b"this is not an image") -> Path:
    path.write_bytes(data)
    return path


def last_lines(text: str, n: int = 1) -> str:
    return " | ".join(text.strip().splitlines()[-n:])[-240:]


# ---- the cases ----------------------------------------------------------------------------


class Corpus:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.good = copies(tmp / "good", [p.name for p in IMAGES[:4]])
        self.lock = threading.Lock()
        self.results: list[Case] = []

    def case(self, item: int, name: str) -> Case:
        c = Case(item, name)
        with self.lock:
            self.results.append(c)
        return c

    def step(self, c: Case, argv: list[str], **kw) -> Step:
        s = run(argv, **kw)
        c.steps.append(s)
        return s

    def simple(self, item: int, name: str, argv: list[str], check: Callable[[Step], str] | None = None,
               **kw) -> Step:
        c = self.case(item, name)
        s = self.step(c, argv, **kw)
        if check is not None and not s.hung:
            c.problem = check(s)
        return s

    # -- items 1-5: real labelled data from elsewhere ------------------------------------------
    def external(self) -> None:
        src = sorted((DATA / "csv-mini" / "images").glob("*.png"))
        blank = self.tmp / "blank"
        copies(blank / "images", [p.name for p in src], src)
        rows = ["path,Pneumonia,Effusion,Mass,patient,split"]
        for i, p in enumerate(src):
            vals = [("1" if (i + k) % 3 == 0 else "0") if (i + k) % 4 else "" for k in range(3)]
            rows.append(f"images/{p.name},{','.join(vals)},{i},test")
        (blank / "labels.csv").write_text("\n".join(rows) + "\n")
        ev = self.tmp / "eval-blank"
        self.simple(1, "evaluate csv with blank labels", ["evaluate", f"csv:{blank}", "--split", "test", "--backend",
                    "onnx", "--bootstrap", "20", "--out", str(ev)], timeout=120,
                    check=lambda s: one_line(s, 0) or ("" if (ev / "metrics.json").is_file() else "no metrics.json"))
        rep = self.tmp / "report-blank"
        self.simple(1, "report csv with blank labels", ["report", f"csv:{blank}", "--split", "test", "--backend",
                    "onnx", "--n", "4", "--out", str(rep)], timeout=120,
                    check=lambda s: one_line(s, 0) or ("" if (rep / "index.html").is_file() else "no index.html"))
        self.simple(1, "tune csv with blank labels (onnx)", ["tune", f"csv:{blank}", "--split", "test", "--model",
                    str(ONNX), "--out", str(self.tmp / "tuned.onnx")], timeout=120)

        nosplit = self.tmp / "nosplit"
        copies(nosplit / "images", [p.name for p in src], src)
        (nosplit / "labels.csv").write_text("file,findings\n" + "".join(
            f"images/{p.name},{'Pneumonia' if i % 2 else 'No Finding'}\n" for i, p in enumerate(src)))
        ev2 = self.tmp / "eval-nosplit"

        def scored_all(s: Step) -> str:
            problem = one_line(s, 0)
            if problem:
                return problem
            text = (ev2 / "report.md").read_text() if (ev2 / "report.md").is_file() else ""
            if "NONE (n=" in text:
                return "report.md shows a phantom subgroup table"
            if f"{len(src)} images scored (every labelled image)" not in s.out:
                return f"does not say all {len(src)} labelled images were scored"
            return ""

        self.simple(2, "evaluate csv without split/sex/age, --split all", ["evaluate", f"csv:{nosplit}", "--split",
                    "all", "--backend", "onnx", "--bootstrap", "0", "--out", str(ev2)], timeout=120, check=scored_all)
        self.simple(3, "info csv without split column", ["info", f"csv:{nosplit}"], check=lambda s: one_line(s, 0))
        out = self.tmp / "nosplit.jsonl"
        self.simple(3, "predict --dataset csv --split all", [*P, "--dataset", f"csv:{nosplit}", "--split", "all",
                    "--format", "jsonl", "--out", str(out)], check=lambda s: expect_good(out, "jsonl", len(src)))

        kids = self.tmp / "paediatric"
        picks = IMAGES[:24]
        copies(kids / "images", [p.name for p in picks], picks)
        (kids / "labels.csv").write_text("file,Pneumonia\n" + "".join(
            f"images/{p.name},{int(i < 2)}\n" for i, p in enumerate(picks)))  # 22 normals, 2 pneumonias
        ev3 = self.tmp / "eval-paediatric"

        def warned(s: Step) -> str:
            problem = one_line(s, 0)
            if problem:
                return problem
            metrics = (ev3 / "metrics.json").read_text() if (ev3 / "metrics.json").is_file() else ""
            return "" if "chestxray tune" in s.out + s.err and "tune" in metrics else "no threshold-transfer warning"

        self.simple(4, "evaluate a set of normals (thresholds that do not transfer)", ["evaluate", f"csv:{kids}",
                    "--split", "all", "--backend", "onnx", "--bootstrap", "0", "--out", str(ev3)], timeout=120,
                    check=warned)

    # -- item 9: --resume with another listing or shard ------------------------------------------
    def interrupted(self, folder: Path, out: Path) -> int:
        """Start a run over `folder`, kill -9 it once 3 results are journaled; the results kept."""
        journal = out.with_name(out.name + ".partial")
        cmd = [*CLI, *P, str(folder), "--batch-size", "1", "--format", "jsonl", "--out", str(out)]
        proc = subprocess.Popen(cmd, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90 and proc.poll() is None:
            if journal.is_file() and journal.read_bytes().count(b"\n") >= 4:  # header + 3 results
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return journal.read_bytes().count(b"\n") - 1 if journal.is_file() else -1

    def resume(self) -> None:
        n = 80
        a = copies(self.tmp / "resume-a", [f"a{i:02d}.png" for i in range(n)], IMAGES[:n])[0].parent
        b = copies(self.tmp / "resume-b", [f"b{i:02d}.png" for i in range(3)], IMAGES[n:n + 3])[0].parent
        out = self.tmp / "resume.jsonl"
        journal = out.with_name(out.name + ".partial")
        c = self.case(9, "kill -9 mid-run, then resume with another folder / shard / the same")
        kept = self.interrupted(a, out)
        if kept < 1:
            c.problem = "the first run left no journal to resume (it finished or failed before the kill)"
            return
        before = journal.read_bytes()
        s1 = self.step(c, [*P, str(b), "--format", "jsonl", "--out", str(out), "--resume"])
        s2 = self.step(c, [*P, str(a), "--format", "jsonl", "--out", str(out), "--resume", "--shard", "1/2"])
        problems = [one_line(s1, 2, "another run"), one_line(s2, 2, "another run")]
        if journal.read_bytes()[: len(before)] != before:
            problems.append("a refused resume changed the journal")
        s3 = self.step(c, [*P, str(a), "--format", "jsonl", "--out", str(out), "--resume"], timeout=120)
        problems.append(one_line(s3, 0) or expect_good(out, "jsonl", n, n))
        c.problem = "; ".join(p for p in problems if p)
        c.name += f" ({kept} journaled before the kill)"

        out2 = self.tmp / "resume-force.jsonl"
        c2 = self.case(9, "kill -9, then resume --force with more folders: keeps the journaled, says what it drops")
        if self.interrupted(a, out2) < 1:
            c2.problem = "the first run left no journal to resume"
            return
        s = self.step(c2, [*P, str(a), str(b), "--format", "jsonl", "--out", str(out2), "--resume", "--force"],
                      timeout=120)
        c2.problem = one_line(s, 0) or expect_good(out2, "jsonl", n + 3, n + 3)

    # -- items 10, 11, 18: names --------------------------------------------------------------
    def names(self) -> None:
        formula = ["=1+1.png", "+SUM(A1).png", "-2.png", "@x.png", "\tx.png", "\rx.png", "a\rb.png", "a\nb.png",
                   "plain.png"]
        folder = self.tmp / "formula"
        copies(folder, formula)
        out = self.tmp / "formula.csv"

        def defused(s: Step) -> str:
            problem = one_line(s, 0) or expect_good(out, "csv", len(formula), len(formula))
            if problem:
                return problem
            names = {Path(n).name for n in rows_of(out, "csv")}
            raw = {n[1:] if n.startswith("'") else n for n in names}
            if raw != set(formula):
                return f"names read back differ: {sorted(map(repr, raw ^ set(formula)))}"
            live = [n for n in rows_of(out, "csv") if n[:1] in "=+-@\t\r"]
            return f"formula cells left live: {live}" if live else ""

        self.simple(10, "csv names starting with = + - @ tab CR, and a CR/LF inside",
                    [*P, str(folder), "--format", "csv", "--out", str(out)], check=defused)
        out_j = self.tmp / "formula.jsonl"

        def raw_kept(s: Step) -> str:
            problem = one_line(s, 0) or expect_good(out_j, "jsonl", len(formula))
            if problem:
                return problem
            names = {Path(n).name for n in rows_of(out_j, "jsonl")}
            return "" if names == set(formula) else "jsonl does not keep the raw names"

        self.simple(10, "jsonl of the same names keeps them raw", [*P, str(folder), "--format", "jsonl", "--out",
                    str(out_j)], check=raw_kept)

        odd = [b"\xff\xfe.png", b"caf\xe9.png", b"back\\slash\xff.png", b"ok.png"]
        folder = self.tmp / "nonutf8"
        made = copies(folder, odd)
        for fmt in ("csv", "jsonl", "parquet"):
            o = self.tmp / f"nonutf8.{fmt}"
            self.simple(11, f"non-UTF-8 names, --format {fmt}", [*P, str(folder), "--format", fmt, "--out", str(o)],
                        check=lambda s, o=o, fmt=fmt: one_line(s, 0) or expect_good(o, fmt, len(odd), len(odd)))
            self.simple(11, f"non-UTF-8 names, --format {fmt} --resume of the finished output",
                        [*P, str(folder), "--format", fmt, "--out", str(o), "--resume"],
                        check=lambda s, o=o, fmt=fmt: one_line(s, 0) or expect_good(o, fmt, len(odd), len(odd)))
        self.simple(11, "non-UTF-8 names, table to stdout", [*P, str(folder)], check=lambda s: one_line(s, 0))
        listing = self.tmp / "nonutf8.list"
        listing.write_bytes(b"".join(os.fsencode(p) + b"\n" for p in made))
        o = self.tmp / "nonutf8-list.csv"
        self.simple(11, "non-UTF-8 names in --from-list", [*P, "--from-list", str(listing), "--format", "csv", "--out",
                    str(o)], check=lambda s: one_line(s, 0) or expect_good(o, "csv", len(odd)))
        listing2 = self.tmp / "latin1.list"  # the list file itself not UTF-8
        listing2.write_bytes(b"".join(os.fsencode(p) + b"\r\n" for p in made))
        o2 = self.tmp / "latin1-list.jsonl"
        self.simple(11, "--from-list with CRLF endings and non-UTF-8 names", [*P, "--from-list", str(listing2),
                    "--format", "jsonl", "--out", str(o2)],
                    check=lambda s: expect_good(o2, "jsonl", len(odd)))

        camdir = self.tmp / "odd-cam"
        oddnames = self.tmp / "odd-names"
        copies(oddnames, [b"\xff\xfe.png", b"=x\r\n.png", b"\x1b[31m.png", b"a" * 251 + b".png"])

        def overlays(s: Step) -> str:
            try:
                recs = json.loads(s.out)
            except ValueError:
                return "the JSON output does not parse"
            shown = sum(1 for r in recs if r.get("overlays"))
            return one_line(s, 0) or ("" if shown == 4 else f"{shown} of 4 images have overlays")

        self.simple(11, "--cam over names not UTF-8, with CR/LF, ESC, 251 characters", [*P, str(oddnames), "--cam",
                    str(camdir), "--format", "json"], timeout=120, check=overlays)

        shown = ["\x1b[31mred.png", "\u202egnp.exe.png", "bell\x07.png", "ok.png"]
        folder = self.tmp / "controls"
        copies(folder, shown)
        bad = garbage(folder / "\x1b]0;title\x07broken.png")

        def escaped(s: Step) -> str:
            problem = one_line(s, 1)
            text = s.out + s.err
            raw = [ch for ch in ("\x1b", "\u202e", "\x07") if ch in text]
            return problem or (f"raw control characters printed: {raw!r}" if raw else "") or (
                "" if "broken.png" in s.err else f"{bad.name!r} missing from the failure list")

        self.simple(18, "table and failure list with ESC, BEL and RLO in names", [*P, str(folder)], check=escaped)

    # -- item 12: odd files --------------------------------------------------------------------
    def odd_files(self) -> None:
        folder = self.tmp / "loop"
        copies(folder, ["x.png", "y.png"])
        (folder / "sub").mkdir()
        os.symlink(".", folder / "self")
        os.symlink("..", folder / "sub" / "up")
        os.symlink("loop2", folder / "loop1")
        os.symlink("loop1", folder / "loop2")
        o = self.tmp / "loop.jsonl"
        self.simple(12, "symlink loops in a folder", [*P, str(folder), "--format", "jsonl", "--out", str(o)],
                    timeout=60, check=lambda s: expect_good(o, "jsonl", 2))

        folder = self.tmp / "fifo"
        copies(folder, ["x.png", "y.png"])
        fifo = folder / "z.png"
        os.mkfifo(fifo)
        o = self.tmp / "fifo.jsonl"
        self.simple(12, "FIFO in a folder", [*P, str(folder), "--format", "jsonl", "--out", str(o)], timeout=60,
                    check=lambda s: expect_good(o, "jsonl", 2))
        self.simple(12, "FIFO as a path", [*P, str(fifo), str(self.good[0])], timeout=60,
                    check=lambda s: one_line(s, 1))
        listing = self.tmp / "fifo.list"
        listing.write_text(f"{fifo}\n{self.good[0]}\n")
        o = self.tmp / "fifo-list.jsonl"
        self.simple(12, "FIFO in --from-list", [*P, "--from-list", str(listing), "--format", "jsonl", "--out", str(o)],
                    timeout=60, check=lambda s: expect_good(o, "jsonl", 1, 2))
        # A FIFO as the list waits for its writer, as `cat` does: here one that comes 1 s late.
        lfifo = self.tmp / "list.fifo"
        os.mkfifo(lfifo)
        cli = " ".join(map(repr, CLI))
        self.simple(12, "a FIFO as the --from-list, its writer 1 s late",
                    [f"(sleep 1; ls -d {str(self.good[0])!r} > {str(lfifo)!r}) & {cli} {' '.join(P)} "
                     f"--from-list {str(lfifo)!r} --format jsonl"], shell=True, timeout=30,
                    check=lambda s: one_line(s, 0) or ("" if s.out.count('"file"') == 1 else "no row"))

        root = self.tmp / "fifo-root"
        copies(root / "images", ["a.png", "b.png", "c.png"])
        os.mkfifo(root / "images" / "d.png")
        (root / "labels.csv").write_text("file,findings\n" + "".join(
            f"images/{n}.png,{'Effusion' if n in 'ac' else 'No Finding'}\n" for n in "abcd"))
        self.simple(12, "prepare a dataset root holding a FIFO", ["prepare", f"csv:{root}", "--cache",
                    str(self.tmp / "fifo-cache"), "--size", "32", "--workers", "1"], timeout=60,
                    check=lambda s: one_line(s, 1) if "d.png" in s.err else "the FIFO is not reported")
        o = self.tmp / "fifo-root.jsonl"
        self.simple(12, "predict --dataset with a FIFO in the root", [*P, "--dataset", f"csv:{root}", "--format",
                    "jsonl", "--out", str(o)], timeout=60, check=lambda s: expect_good(o, "jsonl", 3))

        sparse = self.tmp / "sparse" / "huge.png"
        sparse.parent.mkdir()
        sparse.write_bytes(b"\x89PNG\r\n\x1a\n")
        os.truncate(sparse, 1536 * 2**20)  # 1.5 GB, sparse: nothing is written
        zeros = self.tmp / "sparse" / "zeros.png"
        zeros.touch()
        os.truncate(zeros, 1536 * 2**20)
        o = self.tmp / "sparse.jsonl"

        def small(s: Step) -> str:
            return expect_good(o, "jsonl", 1, 3) or (f"peak RSS {s.rss_mb:.0f} MB" if s.rss_mb > 1000 else "")

        self.simple(12, "1.5 GB sparse .png files (PNG magic, zeros)", [*P, str(sparse.parent), str(self.good[0]),
                    "--format", "jsonl", "--out", str(o)], timeout=60, check=small)
        o2 = self.tmp / "sparse-nocap.jsonl"
        self.simple(12, "1.5 GB of zeros as .png with --max-file-mb 0 (magic checked first)",
                    [*P, str(zeros), str(self.good[0]), "--max-file-mb", "0", "--format", "jsonl", "--out", str(o2)],
                    timeout=60, check=lambda s: expect_good(o2, "jsonl", 1, 2) or (
                        f"peak RSS {s.rss_mb:.0f} MB" if s.rss_mb > 1000 else ""))
        self.simple(12, "/dev/zero as a path", [*P, "/dev/zero", str(self.good[0])], timeout=60,
                    check=lambda s: one_line(s, 1) or (f"peak RSS {s.rss_mb:.0f} MB" if s.rss_mb > 1000 else ""))
        o3 = self.tmp / "devlinks.jsonl"
        self.simple(12, "a folder holding symlinks to /dev/zero and /dev/urandom",
                    [*P, str(self._devlinks()), "--format", "jsonl", "--out", str(o3)], timeout=60,
                    check=lambda s: expect_good(o3, "jsonl", 1))

        bomb = self.tmp / "bomb.dcm"
        sys.path.insert(0, str(REPO / "benchmarks"))
        from serve_load import dicom_header_bomb

        bomb.write_bytes(dicom_header_bomb(2_000_000))
        o = self.tmp / "bomb.jsonl"
        self.simple(12, "DICOM header bomb (2 million private elements) in a bulk run",
                    [*P, str(bomb), str(self.good[0]), "--format", "jsonl", "--out", str(o)], timeout=90,
                    check=lambda s: expect_good(o, "jsonl", 1, 2))

    def _devlinks(self) -> Path:
        folder = self.tmp / "devlinks"
        copies(folder, ["x.png"])
        os.symlink("/dev/zero", folder / "zero.png")
        os.symlink("/dev/urandom", folder / "random.dcm")
        return folder

    # -- item 13: exit 134 ---------------------------------------------------------------------
    def onnx_exit(self) -> None:
        folder = self.tmp / "undecodable"
        folder.mkdir()
        for i in range(3):
            garbage(folder / f"bad{i}.png", os.urandom(512))
        for i in range(4):
            self.simple(13, f"onnx over a folder where nothing decodes (run {i + 1})", [*P, str(folder)],
                        check=lambda s: "" if s.rc == 1 else f"exit {s.rc}")
        o = self.tmp / "done.jsonl"
        self.simple(13, "a finished run", [*P, str(self.good[0].parent), "--format", "jsonl", "--out", str(o)],
                    check=lambda s: expect_good(o, "jsonl", 4))
        for i in range(3):
            self.simple(13, f"--resume with nothing left (run {i + 1})", [*P, str(self.good[0].parent), "--format",
                        "jsonl", "--out", str(o), "--resume"], check=lambda s: one_line(s, 0))

    # -- item 14: outputs --------------------------------------------------------------------
    def outputs(self) -> None:
        g = str(self.good[0].parent)
        self.simple(14, "--out names a folder", [*P, g, "--format", "csv", "--out", str(self.tmp)],
                    check=lambda s: one_line(s, 2))
        victim = self.good[1]
        before = victim.read_bytes()
        self.simple(14, "--out names an input file", [*P, g, "--format", "csv", "--out", str(victim)],
                    check=lambda s: one_line(s, 2) or ("" if victim.read_bytes() == before else "overwrote an input"))
        self.simple(14, "--out under /proc", [*P, g, "--format", "csv", "--out", "/proc/chestxray.csv"],
                    check=lambda s: one_line(s, 2))
        self.simple(14, "--out under /sys (read-only)", [*P, g, "--format", "jsonl", "--out", "/sys/x/y.jsonl"],
                    check=lambda s: one_line(s, 2))
        self.simple(14, "--out with a missing parent folder", [*P, g, "--format", "jsonl", "--out",
                    str(self.tmp / "no" / "such" / "x.jsonl")],
                    check=lambda s: one_line(s, (0, 2)))
        self.simple(14, "table to a --out that is a folder", [*P, g, "--out", str(self.tmp)],
                    check=lambda s: one_line(s, 2))

        long_dir = self.tmp / "long"
        long_name = "a" * 251 + ".png"
        copies(long_dir, [long_name, "b" * 200 + ".png"])
        cam = self.tmp / "cam"
        self.simple(14, "--cam with a 251-character input name", [*P, str(long_dir), "--cam", str(cam)],
                    timeout=120, check=lambda s: one_line(s, 0) or (
                        "" if cam.is_dir() and len(list(cam.iterdir())) >= 2 else "no overlays written"))

        # corrupt finished outputs, then --resume
        for fmt, data in (("jsonl", b"{not json\n\xff\xfe\n"), ("jsonl", b"[1, 2]\n"),
                          ("csv", b"\xff\xfe\x00garbage"), ("csv", b"a,b\n1,2\n"), ("parquet", b"PAR1 nope PAR1")):
            o = self.tmp / f"corrupt-{len(data)}.{fmt}"
            o.write_bytes(data)
            self.simple(14, f"--resume onto a corrupt finished {fmt} ({data[:12]!r})",
                        [*P, g, "--format", fmt, "--out", str(o), "--resume"],
                        check=lambda s, o=o, data=data: one_line(s, 2) or (
                            "" if o.read_bytes() == data else "the damaged output was replaced"))

        # wrong-shape journal lines
        ref = self.tmp / "ref.jsonl"
        s = run([*P, g, "--format", "jsonl", "--out", str(ref)])
        recs = [json.loads(line) for line in ref.read_text().splitlines()] if s.rc == 0 else []
        if not recs:
            self.case(14, "wrong-shape journal lines").problem = f"reference run failed: {last_lines(s.err)}"
            return
        good = recs[0]
        shapes = {
            "a list": [1, 2],
            "a number": 5,
            "file a number": {**good, "file": 5},
            "size 1e400": {**good, "size": 1e400},
            "mtime NaN": {**good, "mtime_ns": float("nan")},
            "findings a number": {**good, "findings": 5},
            "finding without probability": {**good, "findings": [{"finding": "Mass"}]},
            "probability a string": {**good, "findings": [{**good["findings"][0], "probability": "x"}]},
            "warnings a number": {**good, "warnings": 7},
            "model missing": {k: v for k, v in good.items() if k != "model"},
            "header not an object": None,
        }
        for fmt in ("jsonl", "csv", "parquet"):
            for what, rec in shapes.items():
                if fmt != "jsonl" and what not in ("findings a number", "finding without probability",
                                                   "probability a string", "warnings a number"):
                    continue
                o = self.tmp / f"shape-{what.replace(' ', '-')}.{fmt}"
                j = o.with_name(o.name + ".partial")
                lines = [json.dumps(r, allow_nan=True) for r in recs[1:]]
                lines.append('"chestxray"' if rec is None else json.dumps(rec, allow_nan=True))
                if rec is None:
                    lines.reverse()  # the bad line first, where a header goes
                j.write_text("\n".join(lines) + "\n")
                journal = j.read_bytes()

                def kept(s: Step, o: Path = o, j: Path = j, journal: bytes = journal, fmt: str = fmt) -> str:
                    if s.rc == 2:
                        return one_line(s, 2) or ("" if j.is_file() and j.read_bytes() == journal
                                                  else "a refused resume changed the journal")
                    return one_line(s, (0, 1)) or expect_good(o, fmt, 4)

                self.simple(14, f"--resume {fmt} with a journal line that is {what}",
                            [*P, g, "--format", fmt, "--out", str(o), "--resume"], check=kept)

        listing = self.tmp / "nul.list"
        listing.write_bytes(os.fsencode(self.good[0]) + b"\x00evil\n" + os.fsencode(self.good[1]) + b"\n\x00\n")
        o = self.tmp / "nul.jsonl"
        self.simple(14, "NUL bytes in --from-list", [*P, "--from-list", str(listing), "--format", "jsonl", "--out",
                    str(o)], check=lambda s: expect_good(o, "jsonl", 1))
        self.simple(14, "export --onnx into a read-only folder", ["export", "--onnx", "/sys/chestxray.onnx"],
                    timeout=120, check=lambda s: one_line(s, 2))
        self.simple(14, "export --onnx onto a folder", ["export", "--onnx", str(self.tmp)], timeout=120,
                    check=lambda s: one_line(s, 2))

    # -- items 15, 16, 17: training, configs, datasets ----------------------------------------
    def configs(self) -> None:
        root = str(NIH)
        cfg = self.tmp / "laughs.yaml"
        cfg.write_text(LAUGHS)
        self.simple(15, "billion-laughs --config", ["train", "--config", str(cfg)], timeout=60,
                    check=lambda s: one_line(s, 2) or (f"stderr {len(s.err)} bytes" if len(s.err) > 2000 else "") or (
                        f"peak RSS {s.rss_mb:.0f} MB" if s.rss_mb > 1500 else ""))
        bad = {
            "lr": ".nan", "lr ": "-1", "batch_size": "0", "batch_size ": "-4", "epochs": "0", "plateau_factor": "5",
            "workers": "-3", "plateau_patience": "-1", "log_every": "-1", "max_steps": "-1", "uncertain": "maybe",
            "root": "[1, 2]", "image_size": "1e999", "weight_decay": "[1]", "seed": "'x'", "views": "{a: 1}",
        }
        for key, value in bad.items():
            key = key.strip()
            cfg = self.tmp / f"bad-{key}-{value.strip('[]{}.:').replace(' ', '')}.yaml"
            body = f"{key}: {value}\n" if key == "root" else f"root: [{root}]\n{key}: {value}\n"
            cfg.write_text(body)
            self.simple(15, f"--config {key}: {value}", ["train", "--config", str(cfg)], timeout=60,
                        check=lambda s, key=key: one_line(s, 2, key))
        self.simple(15, "--lr nan as a flag", ["train", root, "--lr", "nan"], timeout=60,
                    check=lambda s: one_line(s, 2, "lr"))


    def training(self) -> None:
        root = str(NIH)
        # a tiny real run, from a config whose out: and cache: are relative to it
        cfg_dir = self.tmp / "cfg"
        cfg_dir.mkdir()
        cache = self.tmp / "cache"
        s = self.simple(16, "prepare a 32 px cache", ["prepare", root, "--cache", str(cache), "--size", "32",
                        "--workers", "1"], timeout=180, check=lambda s: one_line(s, 0))
        (cfg_dir / "config.yaml").write_text(
            f"root: [{root}]\nout: run\ncache: {os.path.relpath(cache, cfg_dir)}\nmodel: resnet18\nimage_size: 32\n"
            "batch_size: 16\nepochs: 1\nmax_steps: 1\nweights: none\nfreeze: all\ndevice: cpu\nval_fraction: 0.3\n"
            "workers: 0\n")
        run_dir = cfg_dir / "run"
        s = self.simple(15, "train from a config with a relative out: and cache:", ["train", "--config",
                        str(cfg_dir / "config.yaml"), "--no-tensorboard"], timeout=240, cwd=self.tmp / "good",
                        check=lambda s: one_line(s, 0) or (
                            "" if (run_dir / "checkpoint.pt").is_file() else "the run is not beside its config"))
        if s.rc != 0 or not (run_dir / "checkpoint.pt").is_file():
            return
        import torch

        good = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        first = next(iter(good["model"]))
        moments = {k: {**v, **{m: torch.zeros(3, 3, 3) for m in v if torch.is_tensor(v[m]) and v[m].ndim}}
                   for k, v in good["optimizer"]["state"].items()}
        wrong = {
            "a tensor of the wrong shape": {**good, "model": {**good["model"], first: torch.zeros(3)}},
            "epoch 'x'": {**good, "epoch": "x"},
            "empty optimizer groups": {**good, "optimizer": {"state": {}, "param_groups": []}},
            "optimizer moments of the wrong shape": {**good, "optimizer": {**good["optimizer"], "state": moments}},
            "scheduler last_epoch 'x'": {**good, "scheduler": {"last_epoch": "x"}},
            "best_loss 'x'": {**good, "best_loss": "x"},
            "model a list": {**good, "model": [1, 2, 3]},
            "args a dict": {**good, "args": {"model": "resnet18"}},
            "history not a list": {**good, "history": "not json"},
            "not a dict": [1, 2],
            "empty file": None,
        }
        for what, state in wrong.items():
            d = self.tmp / f"ckpt-{what.replace(' ', '-').replace(chr(39), '')}"
            d.mkdir()
            shutil.copy(run_dir / "config.yaml", d / "config.yaml")
            if state is None:
                (d / "checkpoint.pt").write_bytes(b"")
            else:
                torch.save(state, d / "checkpoint.pt")
            self.simple(16, f"train --resume, checkpoint with {what}", ["train", "--out", str(d), "--resume",
                        "--epochs", "3"], timeout=120, check=lambda s, d=d: one_line(s, 2, str(d / "checkpoint.pt")))

        class Evil:
            def __reduce__(self):
                return (os.getcwd, ())

        for name, data in (("text.pth", b"hello"), ("pickle.pth", pickle.dumps(Evil())),
                           ("bad.safetensors", b"x" * 64), ("config.yaml.pth", (run_dir / "config.yaml").read_bytes())):
            w = self.tmp / name
            w.write_bytes(data)
            self.simple(16, f"train --weights {name}", ["train", root, "--out", str(self.tmp / f"w-{name}"), "--cache",
                        str(cache), "--model", "resnet18", "--image-size", "32", "--weights", str(w), "--freeze",
                        "all", "--epochs", "1", "--max-steps", "1", "--device", "cpu", "--workers", "0"], timeout=120,
                        check=lambda s: one_line(s, 2, "not a state dict") + (
                            " (torch's weights_only advice shown)" if "weights_only" in s.err else ""))

        runs = self.tmp / "runs"
        shutil.copytree(run_dir, runs / "good")
        shutil.copytree(run_dir, runs / "broken")
        (runs / "broken" / "config.yaml").write_text("options: [unclosed\n")
        shutil.copytree(run_dir, runs / "odd")
        (runs / "odd" / "log.jsonl").write_text('{"epoch": "x"}\n[1]\n\xff\n')
        shutil.copytree(run_dir, runs / "laughs")
        (runs / "laughs" / "config.yaml").write_text(LAUGHS)
        for fmt in ("table", "json", "csv"):
            self.simple(17, f"runs DIR with broken runs ({fmt})", ["runs", str(runs), "--format", fmt],
                        check=lambda s: one_line(s, 0) or ("" if s.out.count("broken") >= 3 else
                                                           f"broken runs not shown: {s.out[-300:]}"))

    def datasets(self) -> None:
        root = self.tmp / "outside"
        copies(root / "images", ["a.png", "b.png"])
        copies(self.tmp, ["outside.png"], IMAGES[5:6])
        (root / "labels.csv").write_text(
            "file,findings\nimages/a.png,Effusion\nimages/b.png,No Finding\n../outside.png,Mass\n/etc/passwd,Mass\n"
            "images/../../outside.png,Mass\n")
        for cmd in (["info", f"csv:{root}"], [*P, "--dataset", f"csv:{root}", "--format", "jsonl"]):
            self.simple(17, f"csv: with ../ and /etc/passwd paths, {cmd[0]}", cmd,
                        check=lambda s: one_line(s, 2, "outside") + ("/etc/passwd was read" if "root:x:" in s.out else ""))
        root2 = self.tmp / "json-passwd"
        copies(root2 / "images", ["a.png"])
        (root2 / "labels.csv").write_text("file,findings\nimages/a.png,Effusion\n")
        (root2 / "dataset.json").write_text(json.dumps({"file": "../../../../etc/passwd"}))
        self.simple(17, "dataset.json naming ../../../../etc/passwd", ["info", f"csv:{root2}"],
                    check=lambda s: one_line(s, 2) + ("/etc/passwd was read" if "root:x:" in s.out + s.err else ""))
        (root2 / "dataset.json").write_text(LAUGHS)
        self.simple(17, "dataset.json that is a YAML billion laughs", ["info", f"csv:{root2}"], timeout=60,
                    check=lambda s: one_line(s, 2) or (f"stderr {len(s.err)} bytes" if len(s.err) > 2000 else ""))

        src = DATA / "padchest-mini"
        for what, cell in (("'-'*100000+'1'", "-" * 100000 + "1"), ("'['*100000", "[" * 100000),
                           ("'-'*300000 (over csv's field limit)", "-" * 300000),
                           ("a 5 MB list", "[" + ", ".join(["'normal'"] * 500000) + "]")):
            pad = self.tmp / f"padchest-{len(cell)}"
            shutil.copytree(src, pad)
            gz = next(pad.glob("*.csv.gz"))
            with gzip.open(gz, "rt", newline="") as f:
                rows = list(csv.reader(f))
            rows[1][rows[0].index("Labels")] = cell
            buf = io.StringIO()
            csv.writer(buf).writerows(rows)
            with gzip.open(gz, "wt", newline="") as f:
                f.write(buf.getvalue())
            self.simple(17, f"PadChest Labels cell {what}", ["info", f"padchest:{pad}"], timeout=60,
                        check=lambda s: one_line(s, (0, 2)) or (
                            f"peak RSS {s.rss_mb:.0f} MB" if s.rss_mb > 1500 else ""))

        # malformed label files of a csv: root
        header = "file,findings\n"
        variants: dict[str, bytes] = {
            "empty": b"",
            "header only": header.encode(),
            "binary": os.urandom(2048),
            "BOM and CRLF": b"\xef\xbb\xbf" + (header + "images/a.png,Effusion\n").replace("\n", "\r\n").encode(),
            "NUL bytes": (header + "images/a.png,Eff\0usion\nimages/\0a.png,Mass\n").encode(),
            "a 300000-character cell": (header + "images/a.png," + "x" * 300000 + "\n").encode(),
            "a 300000-character path": (header + "images/" + "a" * 300000 + ".png,Mass\nimages/a.png,Mass\n").encode(),
            "latin-1 text": (header + "images/a.png,Épanchement\n").encode("latin-1"),
            "duplicate columns": b"file,file,findings\nimages/a.png,images/a.png,Mass\n",
            "unbalanced quotes": (header + 'images/a.png,"Mass\nimages/a.png,Effusion\n').encode(),
            "only a split column": b"split\ntest\n",
        }
        for what, data in variants.items():
            d = self.tmp / f"csv-{what.replace(' ', '-')}"
            copies(d / "images", ["a.png"])
            (d / "labels.csv").write_bytes(data)
            self.simple(17, f"csv: labels file with {what}", ["info", f"csv:{d}"], timeout=60,
                        check=lambda s: one_line(s, (0, 2)) or (f"stderr {len(s.err)} bytes" if len(s.err) > 2000
                                                                else ""))

    # -- other commands' output places (item 14's rule: checked before the work) ----------------
    def other_outputs(self) -> None:
        g = str(self.good[0].parent)
        src = sorted((DATA / "csv-mini" / "images").glob("*.png"))
        ds = self.tmp / "out-ds"
        copies(ds / "images", [p.name for p in src], src)
        (ds / "labels.csv").write_text("file,findings\n" + "".join(
            f"images/{p.name},{'Effusion' if i % 2 else 'No Finding'}\n" for i, p in enumerate(src)))
        a_file = self.tmp / "a-file.txt"
        a_file.write_text("keep me\n")
        cases = {
            "evaluate --out under /sys": ["evaluate", f"csv:{ds}", "--split", "all", "--backend", "onnx",
                                          "--bootstrap", "0", "--out", "/sys/chestxray-eval"],
            "evaluate --out a file": ["evaluate", f"csv:{ds}", "--split", "all", "--backend", "onnx", "--bootstrap",
                                      "0", "--out", str(a_file)],
            "report --out a file": ["report", f"csv:{ds}", "--split", "all", "--backend", "onnx", "--n", "2",
                                    "--out", str(a_file)],
            "report --out under /proc": ["report", f"csv:{ds}", "--split", "all", "--backend", "onnx", "--n", "2",
                                         "--out", "/proc/chestxray-report"],
            "tune --out under /sys": ["tune", f"csv:{ds}", "--split", "all", "--model", str(ONNX), "--out",
                                      "/sys/chestxray.onnx"],
            "tune --out a folder": ["tune", f"csv:{ds}", "--split", "all", "--model", str(ONNX), "--out",
                                    str(self.tmp)],
            "tune --out the model itself": ["tune", f"csv:{ds}", "--split", "all", "--model", str(ONNX), "--out",
                                            str(ONNX)],
            "predict --features under /sys": [*P, g, "--features", "/sys/chestxray.npy"],
            "predict --features a folder": [*P, g, "--features", str(self.tmp)],
            "predict --features an input": [*P, g, "--features", str(self.good[2])],
            "predict --cam a file": [*P, g, "--cam", str(a_file)],
            "predict --cam under /sys": [*P, g, "--cam", "/sys/chestxray-cam"],
            "runs --out under /sys": ["runs", str(self.tmp), "--out", "/sys/runs.csv"],
            "runs --plot under /sys": ["runs", str(self.tmp), "--plot", "/sys/runs.png"],
            "prepare --cache a file": ["prepare", str(NIH), "--cache", str(a_file), "--size", "32", "--workers", "1"],
            "prepare --cache under /sys": ["prepare", str(NIH), "--cache", "/sys/chestxray-cache", "--size", "32",
                                           "--workers", "1"],
        }
        before = {p: p.read_bytes() for p in (a_file, ONNX, self.good[2])}
        for what, argv in cases.items():
            self.simple(14, what, argv, timeout=120, check=lambda s: one_line(s, (0, 2)) or "".join(
                f"{p.name} changed; " for p, data in before.items() if p.read_bytes() != data))

    # -- bad flag values and model files (beyond the list; each should be one line) -----
    def flags(self) -> None:
        g = str(self.good[0])
        text = self.tmp / "model.txt"
        text.write_text("not a model\n")
        junk = {".onnx": b"", ".safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"}
        models = [str(text), str(self.tmp / "missing.safetensors"), str(self.tmp)]
        for suffix, data in junk.items():
            f = self.tmp / f"junk{suffix}"
            f.write_bytes(data)
            models.append(str(f))
        for m in models:
            self.simple(0, f"predict --model {Path(m).name}", ["predict", g, "--model", m, "--no-progress"],
                        check=lambda s: one_line(s, 2))
        self.simple(0, "export --model a text file", ["export", "--model", str(text), "--onnx",
                    str(self.tmp / "x.onnx")], timeout=120, check=lambda s: one_line(s, 2))
        self.simple(0, "ensemble of a text file", ["ensemble", "--models", str(text), str(text), "--out",
                    str(self.tmp / "ens.safetensors")], timeout=120, check=lambda s: one_line(s, 2))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        self.simple(0, "serve --model an empty .onnx", ["serve", "--model", str(self.tmp / "junk.onnx"), "--host",
                    "127.0.0.1", "--port", port], timeout=25, check=lambda s: one_line(s, 2))
        bad = {
            "predict": [("--shard", "5/2"), ("--shard", "a/b"), ("--batch-size", "0"), ("--batch-size", "-1"),
                        ("--workers", "-1"), ("--max-file-mb", "-1"), ("--max-file-mb", "nan"),
                        ("--progress-every", "nan"), ("--findings", "Nope")],
            "evaluate": [("--bootstrap", "-1"), ("--by", "nonsense"), ("--batch-size", "0"),
                         ("--labels", "google2019:/etc/passwd")],
            "report": [("--n", "0"), ("--n", "-1")],
            "tune": [("--threshold-policy", "sensitivity=2"), ("--threshold-policy", "ppv=nan"),
                     ("--threshold-policy", "x" * 5000)],
        }
        for cmd, pairs in bad.items():
            for flag, value in pairs:
                if cmd == "predict":
                    argv = [*P, g, flag, value] + (["--cam", str(self.tmp / "c")] if flag == "--findings" else [])
                elif cmd == "tune":
                    argv = ["tune", str(NIH), "--model", str(ONNX), "--out", str(self.tmp / "t.onnx"), flag, value]
                else:
                    argv = [cmd, str(NIH), "--backend", "onnx", "--out", str(self.tmp / f"o-{cmd}"), flag, value]
                self.simple(0, f"{cmd} {flag} {value[:30]}", argv, timeout=120,
                            check=lambda s: one_line(s, 2) or (f"stderr {len(s.err)} bytes" if len(s.err) > 2000
                                                               else ""))
        for root in ("/nonexistent", "/etc/passwd", "csv:", "nope:/tmp", "csv:/etc", "padchest:/etc", "vindr:/proc"):
            self.simple(17, f"info {root}", ["info", root], timeout=60, check=lambda s: one_line(s, 2))

    # -- item 18: serve flags and --from-list pipes --------------------------------------------
    def small(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        for flag, value in (("--max-upload-mb", "inf"), ("--max-upload-mb", "nan"), ("--max-upload-mb", "-1"),
                            ("--max-wait-ms", "nan"), ("--max-wait-ms", "inf"),
                            ("--max-wait-ms", "-5"), ("--request-deadline-s", "nan"), ("--max-decode-mb", "inf"),
                            ("--body-timeout-s", "nan"), ("--min-receive-kib-s", "nan"), ("--header-timeout-s", "inf")):
            self.simple(18, f"serve {flag} {value}", ["serve", "--backend", "onnx", "--host", "127.0.0.1", "--port", port,
                        flag, value], timeout=25, check=lambda s, flag=flag: one_line(s, 2, flag))
        g = self.good[0].parent
        o = self.tmp / "pipe.jsonl"
        cli = " ".join(map(repr, CLI))
        self.simple(18, "--from-list <(find ...)",
                    [f"{cli} {' '.join(P)} --from-list <(find {str(g)!r} -name '*.png') --format jsonl "
                     f"--out {str(o)!r}"], shell=True, check=lambda s: one_line(s, 0) or expect_good(o, "jsonl", 4))
        self.simple(18, "--from-list /dev/stdin fed by find",
                    [f"find {str(g)!r} -name '*.png' | {cli} {' '.join(P)} --from-list /dev/stdin --format jsonl"],
                    shell=True, check=lambda s: one_line(s, 0) or ("" if s.out.count('"file"') == 4 else
                                                                   "not every file has a row"))

        import numpy as np
        import pydicom
        from PIL import Image
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

        pixels = np.asarray(Image.open(IMAGES[0]).convert("L"))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        warnings.simplefilter("ignore")  # pydicom warns, rightly, about the values set below
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "CR", "HOSTILE^PATIENT", "ID-HOSTILE-42"
        ds.BodyPartExamined = "DOE^JOHN"
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds.ViewPosition = "SIDEWAYS^SMITH"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = pixels.tobytes()
        dcm = self.tmp / "odd-tags.dcm"
        ds.save_as(dcm, enforce_file_format=True)

        def private(s: Step) -> str:
            text = s.out + s.err
            leaked = [v for v in ("DOE^JOHN", "SMITH", "HOSTILE", "ID-HOSTILE", "Unknown encoding") if v in text]
            return one_line(s, 0) or (f"printed {leaked}" if leaked else "")

        self.simple(18, "DICOM with a patient name in BodyPartExamined and an unknown charset",
                    [*P, str(dcm), "--format", "json"], check=private)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="groups of cases run at once (default 2)")
    ap.add_argument("--only", default="", help="comma-separated groups: external,resume,names,odd_files,"
                    "onnx_exit,outputs,other_outputs,training,configs,datasets,flags,small")
    ap.add_argument("--src", default=None, help="run the commands from this src folder (e.g. an older checkout's)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    ap.add_argument("--json", default=None, help="also write the per-case results here")
    args = ap.parse_args()
    if args.src:
        ENV["PYTHONPATH"] = os.pathsep.join([str(Path(args.src).resolve()), os.environ.get("PYTHONPATH", "")])

    groups = ["training", "configs", "external", "resume", "names", "odd_files", "onnx_exit", "outputs", "other_outputs",
              "datasets", "flags", "small"]
    if args.only:
        groups = [g for g in groups if g in args.only.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="chestxray-hostile-"))
    t0 = time.monotonic()
    try:
        corpus = Corpus(tmp)

        def group(name: str) -> None:
            try:
                getattr(corpus, name)()
            except Exception as exc:  # a broken builder is the corpus's fault: report it as a failed case
                corpus.case(0, f"building {name}").problem = f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
            list(pool.map(group, groups))
        wall = time.monotonic() - t0
        cases = sorted(corpus.results, key=lambda c: c.item)
        steps = [s for c in cases for s in c.steps]
        print(f"{'item':>4}  {'rc':>8}  {'s':>5}  {'MB':>5}  tb hang  case")
        for c in cases:
            rcs = ",".join(str(s.rc) for s in c.steps) or "-"
            secs = sum(s.seconds for s in c.steps)
            rss = max((s.rss_mb for s in c.steps), default=0)
            tb = "TB" if any(s.traceback or s.crashed for s in c.steps) else "- "
            hang = "HANG" if any(s.hung for s in c.steps) else "-   "
            print(f"{c.item:>4}  {rcs[-8:]:>8}  {secs:5.1f}  {rss:5.0f}  {tb} {hang} {c.name!r:.110}")
            if c.problem:
                print(f"{'':>30}-> {c.problem[:400]}")
            for s in c.steps:
                if s.traceback or s.crashed:
                    print(f"{'':>30}   {' '.join(s.argv)[-160:]}\n{'':>30}   {last_lines(s.err, 3)}")
        n_tb = sum(1 for s in steps if s.traceback or s.crashed)
        n_hang = sum(1 for s in steps if s.hung)
        n_prob = sum(1 for c in cases if c.problem)
        print(f"\n{len(cases)} cases, {len(steps)} commands in {wall:.0f} s: {n_tb} tracebacks or crashes, "
              f"{n_hang} hangs, {n_prob} failed checks")
        if args.json:
            Path(args.json).write_text(json.dumps([
                {"item": c.item, "case": c.name, "problem": c.problem,
                 "steps": [{"argv": s.argv, "rc": s.rc, "seconds": round(s.seconds, 2), "rss_mb": round(s.rss_mb),
                            "traceback": s.traceback, "crashed": s.crashed, "hung": s.hung,
                            "stderr_tail": s.err[-2000:]} for s in c.steps]} for c in cases], indent=1))
        return 1 if n_tb or n_hang or n_prob else 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
