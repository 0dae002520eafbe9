"""Bulk `chestxray predict` over a folder of real 1024-px radiographs.

    python benchmarks/predict_folder.py [--count 300] [--rounds 3] [--big 100000 --big-seconds 240]

In one run, on a temporary folder of the NIH originals linked --count times (real PNG
decode on every file), round by round so that load from other processes hits all alike:
  (a) decode-only: decode + preprocess through the pipeline's worker pool, same worker count;
  (b) `chestxray predict --format jsonl --out ...` end to end, in this process (model load,
      listing, pipeline, final file), per backend; default workers and --workers 1;
  (c) today's serial path: `Analyzer.predict(files)` (one process, onnxruntime's own threads);
  plus the one-process decode+inference rate (the pipeline with --workers 0);
  and the CPU time per image of decode+preprocess and of inference (onnxruntime 1 thread, as
  the pipeline runs it: the network and the per-image checks, `Analyzer.run`), giving the
  CPU-work bound cores / (decode + inference).
`--big N` then links N entries and runs the same pipeline over them (for --big-seconds, or to
the end with 0), reporting the rate per window and the resident memory of the process and its
workers; and times writing the final file from an N-record journal.
`--device cuda` (GPU machine): the torch backend end to end on the GPU and the GPU's own
model-bound rate (batches already on the device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ORIGINALS = [REPO / "tests" / "data" / "nih-mini" / "originals", REPO.parent / "shared" / "nih-sample" / "originals",
             Path("/work/shared/nih-sample/originals")]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--originals", nargs="*", help="folders of 1024-px PNGs (default: the repo's and ../shared's)")
    p.add_argument("--count", type=int, default=300, help="files in the benchmark folder (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--workers", type=int, default=None, help="decoder processes (default: all cores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backends", default="onnx,torch", help="end-to-end backends (default onnx,torch)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--cpu-sample", type=int, default=0,
                   help="files for the CPU-time measurements (default: each original once)")
    p.add_argument("--big", type=int, default=0, help="also run a folder of this many entries (e.g. 100000)")
    p.add_argument("--big-seconds", type=float, default=240, help="stop the big run after S s (0: to the end)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


def originals(args: argparse.Namespace) -> list[Path]:
    folders = [Path(f) for f in args.originals] if args.originals else [f for f in ORIGINALS if f.is_dir()]
    files = sorted({p.resolve() for f in folders for p in f.glob("*.png")})
    if not files:
        sys.exit("no originals found; pass --originals FOLDER")
    return files


def link_folder(folder: Path, sources: list[Path], count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        src = sources[k % len(sources)]
        os.symlink(src, folder / f"{k:07d}_{src.name}")
    return folder


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes, from /proc (psutil is not a dependency)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def cpu_costs(files: list[Path], batch: int) -> dict:
    """CPU seconds per image of decode+preprocess and of inference, in this one process."""
    from chestxray.inference.predict import Analyzer

    a = Analyzer.load(backend="onnx", threads=1)
    c0 = cpu_self()
    xs = [a.preprocess(str(f))[1] for f in files]
    c1 = cpu_self()
    x = np.stack(xs)
    reps = 3
    # Inference is what predict runs per batch: Analyzer.run, the network and the checks that
    # come with every prediction (input check, orientation); the network alone is reported too.
    c2 = cpu_self()
    for _ in range(reps):
        for i in range(0, len(x), batch):
            a.run(x[i : i + batch])
    c3 = cpu_self()
    for _ in range(reps):
        for i in range(0, len(x), batch):
            a.probabilities(x[i : i + batch])
    c4 = cpu_self()
    n = reps * len(files)
    dec, inf = (c1 - c0) / len(files), (c3 - c2) / n
    return {"decode_cpu_ms": 1000 * dec, "infer_cpu_ms": 1000 * inf, "network_only_cpu_ms": 1000 * (c4 - c3) / n,
            "bound_img_s": cores() / (dec + inf)}


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, from /proc (the pool's workers are not our OS children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rate_pipeline(folder: Path, workers: int, batch: int, threads: int | None = 1) -> tuple[float, float, float]:
    """(images/s, CPU ms per image of this process and its decoder workers together, the
    cores' share those processes got: CPU seconds / wall seconds / cores)."""
    import multiprocessing

    from chestxray.inference.inputs import iter_inputs
    from chestxray.inference.predict import Analyzer

    a = Analyzer.load(backend="onnx", threads=threads)
    worker_cpu: dict[int, float] = {}
    t, c = time.perf_counter(), cpu_self()
    n = 0
    for _ in a.predict_files(iter_inputs([folder]), workers=workers, batch_size=batch):
        n += 1
        if n % batch == 0:
            for child in multiprocessing.active_children():
                if child.pid and "forkserver" not in (child.name or ""):
                    worker_cpu[child.pid] = proc_cpu_s(child.pid)
    dt, dc = time.perf_counter() - t, cpu_self() - c
    used = dc + sum(worker_cpu.values())
    return n / dt, 1000 * used / n, used / dt / cores()


def rate_decode_only(folder: Path, workers: int, batch: int) -> float:
    from chestxray.inference.inputs import iter_inputs
    from chestxray.inference.pipeline import DecodePool, chunked
    from chestxray.inference.predict import Analyzer

    a = Analyzer.load(backend="onnx", threads=1)
    t = time.perf_counter()
    n = 0
    with DecodePool(a, workers) as pool:
        for chunk, _ in pool.map(chunked(iter_inputs([folder]), batch)):
            n += len(chunk)
    return n / (time.perf_counter() - t)


def rate_cli(folder: Path, work: Path, backend: str, workers: int | None, batch: int, device: str) -> float:
    from chestxray.cli import main

    out = work / f"out-{backend}-{workers}.jsonl"
    argv = ["predict", str(folder), "--backend", backend, "--format", "jsonl", "--out", str(out),
            "--no-progress", "--batch-size", str(batch), "--device", device]
    if workers is not None:
        argv += ["--workers", str(workers)]
    n = len(os.listdir(folder))
    t = time.perf_counter()
    code = main(argv)
    dt = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"predict failed ({code}) on {folder}")
    lines = out.read_bytes().count(b"\n")
    assert lines == n, (lines, n)
    out.unlink()
    return n / dt


def rate_serial_today(files: list[Path]) -> float:
    from chestxray.inference.predict import Analyzer

    a = Analyzer.load(backend="onnx")
    t = time.perf_counter()
    a.predict([str(f) for f in files])
    return len(files) / (time.perf_counter() - t)


def gpu_model_bound(batch: int = 256, reps: int = 20) -> float:
    import torch

    from chestxray.inference.predict import Analyzer

    a = Analyzer.load(backend="torch", device="cuda")
    size = a.preprocessing.size
    x = torch.rand(batch, 1, size, size, device="cuda")
    a.probabilities(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a.probabilities(x)
    torch.cuda.synchronize()
    return batch * reps / (time.perf_counter() - t)


def rate_steady(folder: Path, workers: int, batch: int, backend: str, device: str) -> dict:
    """The pipeline alone (model loaded, workers warm after the first result): images/s from
    the first result to the last, and the seconds until the first result."""
    from chestxray.inference.inputs import iter_inputs
    from chestxray.inference.predict import Analyzer

    t0 = time.perf_counter()
    a = Analyzer.load(backend=backend, device=device)
    loaded = time.perf_counter()
    n, first = 0, None
    for _ in a.predict_files(iter_inputs([folder]), workers=workers, batch_size=batch):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"load_s": round(loaded - t0, 2), "first_result_s": round((first or end) - loaded, 2),
            "steady_img_s": round((n - 1) / max(end - (first or end), 1e-9), 1)}


def big_run(work: Path, sources: list[Path], n: int, seconds: float, workers: int, batch: int) -> dict:
    """The CLI's own path (pipeline + journal) over an n-entry folder: rate per window, RSS."""
    from chestxray.inference.inputs import iter_inputs
    from chestxray.inference.outputs import Journal, finalize, to_record
    from chestxray.inference.predict import Analyzer

    folder = work / "big"
    t = time.perf_counter()
    link_folder(folder, sources, n)
    log(f"linked {n} entries in {time.perf_counter() - t:.1f} s")
    a = Analyzer.load(backend="onnx", threads=1)
    journal = Journal(work / "big.jsonl.partial", resume=False, model_name=a.name)
    windows: list[dict] = []
    start = last = time.perf_counter()
    done = last_done = 0
    import multiprocessing

    batch_recs = []
    for f, p in a.predict_files(iter_inputs([folder]), workers=workers, batch_size=batch):
        batch_recs.append(to_record(f, p))
        done += 1
        if len(batch_recs) >= batch:
            journal.append(batch_recs)
            batch_recs = []
        now = time.perf_counter()
        if now - last >= 10:
            kids = sorted(c.pid for c in multiprocessing.active_children()
                          if c.pid and "forkserver" not in (c.name or ""))
            windows.append({"t": round(now - start, 1), "done": done, "img_s": round((done - last_done) / (now - last), 1),
                            "rss_mib": round(rss_mib([os.getpid(), *kids]), 1),
                            "rss_main_mib": round(rss_mib([os.getpid()]), 1),
                            "rss_workers_mib": [round(rss_mib([k]), 1) for k in kids],
                            "load_1min": round(os.getloadavg()[0], 2)})
            log(f"  big: {windows[-1]}")
            last, last_done = now, done
        if seconds and now - start >= seconds:
            break
    journal.append(batch_recs)
    journal.close()
    elapsed = time.perf_counter() - start
    # The final file from an n-record journal (what the end of a full run adds).
    jpath = work / "big.jsonl.partial"
    one = jpath.read_bytes().splitlines(keepends=True)[0]
    with open(jpath, "wb") as fh:
        for _ in range(n):
            fh.write(one)
    t = time.perf_counter()
    finalize(work / "big.csv", "csv", [jpath], a.labels)
    finalize_s = time.perf_counter() - t
    steady = windows[1:] or windows
    rates = [w["img_s"] for w in steady]
    rss = [w["rss_mib"] for w in steady]
    return {"entries": n, "processed": done, "seconds": round(elapsed, 1), "img_s": round(done / elapsed, 1),
            "window_img_s_min": min(rates) if rates else None, "window_img_s_max": max(rates) if rates else None,
            "first_third_img_s": round(statistics.mean(rates[: max(1, len(rates) // 3)]), 1) if rates else None,
            "last_third_img_s": round(statistics.mean(rates[-max(1, len(rates) // 3):]), 1) if rates else None,
            "rss_mib_min": min(rss) if rss else None, "rss_mib_max": max(rss) if rss else None,
            "rss_main_mib_first_last": [steady[0]["rss_main_mib"], steady[-1]["rss_main_mib"]] if steady else None,
            "rss_workers_mib_first_last": [steady[0]["rss_workers_mib"], steady[-1]["rss_workers_mib"]] if steady else None,
            "finalize_csv_s_for_n_records": round(finalize_s, 1), "windows": windows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from chestxray.inference.pipeline import default_workers

    sources = originals(args)
    workers = args.workers if args.workers is not None else default_workers()
    backends = [b for b in args.backends.split(",") if b]
    result: dict = {
        "machine": {"cpu": platform.processor(), "cores": cores(), "python": platform.python_version(),
                    "load_average_start": list(os.getloadavg())},
        "folder": {"files": args.count, "distinct_originals": len(sources), "px": 1024},
        "workers": workers, "batch_size": args.batch_size, "rounds": [],
    }
    with tempfile.TemporaryDirectory(prefix="predict-folder-") as tmp:
        work = Path(tmp)
        folder = link_folder(work / "folder", sources, args.count)
        files = sorted(folder.iterdir())
        sample = files[: max(args.cpu_sample, len(sources))]  # the first len(sources): each original once
        for r in range(args.rounds):
            row: dict = {"round": r}
            row.update(cpu_costs(sample, args.batch_size))
            row["a_decode_only_img_s"] = rate_decode_only(folder, workers, args.batch_size)
            for b in backends:
                row[f"b_predict_{b}_img_s"] = rate_cli(folder, work, b, None, args.batch_size, args.device)
            row["b_predict_onnx_workers1_img_s"] = rate_cli(folder, work, "onnx", 1, args.batch_size, args.device)
            row["one_process_decode_infer_img_s"] = rate_pipeline(folder, 0, args.batch_size)[0]
            rate, cpu_ms, share = rate_pipeline(folder, workers, args.batch_size)
            row["pipeline_default_workers_img_s"] = rate
            # CPU the whole pipeline spends per image (main + workers), vs decode + infer alone:
            row["pipeline_cpu_ms_per_img"] = cpu_ms
            row["pipeline_cpu_overhead"] = cpu_ms / (row["decode_cpu_ms"] + row["infer_cpu_ms"]) - 1
            # On a shared machine the pipeline gets only part of the cores (1.0: both, all the time).
            row["pipeline_cores_share_got"] = share
            row["load_average_1min"] = os.getloadavg()[0]
            row["c_serial_today_img_s"] = rate_serial_today(files)
            row["ratio_b_onnx_over_a"] = row["b_predict_onnx_img_s"] / row["a_decode_only_img_s"]
            row["ratio_b_onnx_over_bound"] = row["b_predict_onnx_img_s"] / row["bound_img_s"]
            row["ratio_workers1_over_one_process"] = (
                row["b_predict_onnx_workers1_img_s"] / row["one_process_decode_infer_img_s"]
            )
            row = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
            result["rounds"].append(row)
            log(json.dumps(row))
        keys = [k for k in result["rounds"][0] if k != "round"] if result["rounds"] else []
        result["median"] = {k: round(statistics.median(r[k] for r in result["rounds"]), 3) for k in keys}
        if args.device.startswith("cuda"):
            result["gpu_model_bound_img_s"] = gpu_model_bound()
            result["gpu_pipeline_torch_cuda"] = rate_steady(folder, workers, args.batch_size, "torch", args.device)
            result["pipeline_onnx_cpu"] = rate_steady(folder, workers, args.batch_size, "onnx", "cpu")
        if args.big:
            result["big"] = big_run(work, sources, args.big, args.big_seconds, workers, args.batch_size)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        m = result["median"]
        print(f"{cores()} cores, {workers} workers, {args.count} x 1024-px PNG, medians of {args.rounds} rounds:")
        for k, v in m.items():
            print(f"  {k:40s} {v}")
        if "big" in result:
            print("  big:", {k: v for k, v in result["big"].items() if k != "windows"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
