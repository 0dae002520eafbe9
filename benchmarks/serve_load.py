"""Load and abuse test of `chestxray serve`.

Starts the real server (`python -m chestxray.cli serve`) in a subprocess on a free loopback
port, with a given bundle or a random-weight one (resnet18 at 64 px as the tests use, or
--arch/--image-size),
then:
  1. fires a bounded load of real radiographs at POST /api/v1/predict (default 500 requests,
     8 in flight, stopped early at a time cap) and reports requests/s, p50/p95/p99 latency
     and the number of errors (anything but 200 with 14 findings);
  2. sends each bad input (empty, text, truncated PNG, wrong form field, oversized with and
     without Content-Length, unknown Grad-CAM finding) and checks for a 4xx answer and that
     the server still answers a real image afterwards.
Exit status 0 only when there were no errors and every bad input passed.

    python benchmarks/serve_load.py                       # resnet18 at 64 px, 500 requests
    python benchmarks/serve_load.py --arch densenet121 --image-size 224
    python benchmarks/serve_load.py --model runs/x/model.safetensors --requests 200 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = ROOT / "tests" / "data" / "nih-mini" / "images"


def random_bundle(folder: Path, arch: str = "resnet18", size: int = 64) -> Path:
    """A bundle with seeded random weights (default resnet18 at 64 px, as the tests use): the
    server's own cost; pass a bigger architecture/size to see a production-sized network."""
    import numpy as np
    import torch

    from chestxray.labels import FINDINGS
    from chestxray.models.bundle import BundleMeta, save_bundle
    from chestxray.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(arch, weights="none", freeze="all", image_size=size).eval()
    meta = BundleMeta(architecture=arch, labels=list(FINDINGS), preprocessing=model.preprocessing,
                      thresholds=list(np.linspace(0.3, 0.7, len(FINDINGS))), name=f"random-{arch}-{size}px",
                      training={"data": "none (random weights, for load tests)"})
    return save_bundle(model, meta, folder / "random.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_upload_mb: float, backend: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "chestxray.cli", "serve", "--model", str(model), "--backend", backend,
           "--host", "127.0.0.1", "--port", str(port), "--max-upload-mb", str(max_upload_mb)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, base: str, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited early:\n{proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer /healthz within {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run_load(base: str, images: list[bytes], n: int, concurrency: int, time_cap: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120.0, limits=limits) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal started
            while started < n and time.perf_counter() - t0 < time_cap:
                data = images[started % len(images)]
                started += 1
                t = time.perf_counter()
                try:
                    r = await client.post("/api/v1/predict", files={"file": ("upload", data, "image/png")})
                    ok = r.status_code == 200 and len(r.json().get("findings", [])) == 14
                    key = None if ok else f"HTTP {r.status_code}"
                except (httpx.HTTPError, ValueError) as exc:
                    key = type(exc).__name__
                latencies.append(time.perf_counter() - t)
                if key:
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    done = len(latencies)
    ms = [x * 1000 for x in latencies]
    return {
        "requests": done, "planned": n, "concurrency": concurrency, "wall_s": round(wall, 2),
        "stopped_by_time_cap": done < n, "requests_per_s": round(done / wall, 2) if wall else None,
        "latency_ms": {"p50": round(percentile(ms, 50), 1), "p95": round(percentile(ms, 95), 1),
                       "p99": round(percentile(ms, 99), 1), "mean": round(statistics.fmean(ms), 1) if ms else None,
                       "max": round(max(ms), 1) if ms else None},
        "errors": sum(errors.values()), "error_kinds": errors,
    }


def bad_inputs(base: str, good: bytes, truncated: bytes, max_upload_bytes: int) -> list[dict]:
    oversized = b"\x89PNG\r\n\x1a\n" + os.urandom(max_upload_bytes + 1024)

    def chunks():  # no Content-Length: the server must stop while reading
        yield (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n"
               b"Content-Type: image/png\r\n\r\n")
        for i in range(0, len(oversized), 256 * 1024):
            yield oversized[i:i + 256 * 1024]
        yield b"\r\n--B--\r\n"

    cases = {
        "empty file": dict(files={"file": ("upload", b"", "image/png")}),
        "text file": dict(files={"file": ("upload", b"just some text\n" * 100, "text/plain")}),
        "truncated PNG": dict(files={"file": ("upload", truncated, "image/png")}),
        "wrong form field": dict(files={"image": ("upload", good, "image/png")}),
        "not multipart": dict(content=good, headers={"content-type": "image/png"}),
        "oversized": dict(files={"file": ("upload", oversized, "image/png")}),
        "oversized, chunked": dict(content=chunks(), headers={"content-type": "multipart/form-data; boundary=B"}),
        "unknown CAM finding": dict(files={"file": ("upload", good, "image/png")}, params={"finding": "Fracture"}),
    }
    out = []
    with httpx.Client(base_url=base, timeout=60.0) as client:
        for name, kwargs in cases.items():
            path = "/api/v1/cam" if "CAM" in name else "/api/v1/predict"
            try:
                r = client.post(path, **kwargs)
                status, detail = r.status_code, r.json().get("detail", "")
            except httpx.HTTPError as exc:  # e.g. the connection closed before the answer was read
                status, detail = None, f"{type(exc).__name__}: {exc}"
            with httpx.Client(base_url=base, timeout=60.0) as fresh:  # a new connection, as a new client
                after = fresh.post("/api/v1/predict", files={"file": ("upload", good, "image/png")})
            out.append({"input": name, "status": status, "detail": detail,
                        "ok": status is not None and 400 <= status < 500,
                        "still_serving": after.status_code == 200})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bundle to serve (default: a random-weight bundle, see --arch)")
    ap.add_argument("--arch", default="resnet18", help="architecture of the random-weight bundle (default resnet18)")
    ap.add_argument("--image-size", type=int, default=64, help="input size of the random-weight bundle (default 64)")
    ap.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of real PNG radiographs")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--time-cap", type=float, default=180.0, help="stop starting requests after this many seconds")
    ap.add_argument("--max-upload-mb", type=float, default=20.0)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)

    paths = sorted(Path(args.images).glob("*.png"))
    if not paths:
        raise SystemExit(f"no PNG images in {args.images}")
    images = [p.read_bytes() for p in paths]
    original = ROOT / "tests" / "data" / "nih-mini" / "originals" / "00000001_000.png"
    truncated = (original.read_bytes() if original.exists() else images[0])
    truncated = truncated[: len(truncated) // 3]

    with tempfile.TemporaryDirectory(prefix="chestxray-serve-load-") as tmp:
        model = Path(args.model) if args.model else random_bundle(Path(tmp), args.arch, args.image_size)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server(model, port, args.max_upload_mb, args.backend)
        try:
            startup = wait_ready(proc, base, timeout=180)
            name = httpx.get(f"{base}/api/v1/model").json()["name"]
            load = asyncio.run(run_load(base, images, args.requests, args.concurrency, args.time_cap))
            bad = bad_inputs(base, images[0], truncated, int(args.max_upload_mb * 2**20))
            alive = httpx.get(f"{base}/healthz").status_code == 200 and proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    report = {
        "model": name, "backend": args.backend, "images": f"{len(images)} real NIH PNGs from {args.images}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "server_startup_s": round(startup, 1), "load": load, "bad_inputs": bad, "alive_at_end": alive,
    }
    passed = load["errors"] == 0 and all(b["ok"] and b["still_serving"] for b in bad) and alive
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        lat = load["latency_ms"]
        print(f"model {name} ({args.backend}); {report['images']}; {report['machine']}")
        print(f"load: {load['requests']}/{load['planned']} requests, {load['concurrency']} in flight, "
              f"{load['wall_s']} s{' (time cap hit)' if load['stopped_by_time_cap'] else ''}")
        print(f"  {load['requests_per_s']} requests/s; latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
              f"p99 {lat['p99']} ms, max {lat['max']} ms; errors {load['errors']} {load['error_kinds'] or ''}")
        print("bad inputs:")
        for b in bad:
            print(f"  {b['input']:<22} -> {b['status']} {'ok' if b['ok'] else 'FAIL'}; "
                  f"still serving: {'yes' if b['still_serving'] else 'NO'}  ({b['detail'][:70]})")
        print(f"server alive at the end: {'yes' if alive else 'NO'}; {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
