"""Load and abuse test of `chestxray serve`, with the standard library only (runs from a
`.[serve]` install; no httpx, no dev extra). Everything talks to 127.0.0.1, and every part
is bounded in request count and time.

It starts the real server (`python -m chestxray.cli serve`) in a subprocess on a free
loopback port for each configuration and measures:
  throughput  requests/s and p50/p99 latency of POST /api/v1/predict with the 93 real NIH
              PNGs at 1, 8 and 32 requests in flight, with batching (--max-batch 16) and
              without (--max-batch 1), for the torch and the onnx backend of the bundled model;
  memory      the server's RSS (idle, peak, 3 s after) while 8 and then 40 clients upload at once
              a 7000 x 7000 16-bit RGBA PNG (built here, ~400 KB), and the answers they got;
  health      /healthz latency, polled every 20 ms, during a burst of 200 concurrent uploads,
              and what the 200 got (200, 503 with Retry-After, anything else);
  dicombomb   /healthz latency, polled every 20 ms, while 3 clients upload at once a DICOM
              header bomb (a Part-10 file of 2 million empty private elements and no pixels,
              16 MB, built here), and what the 3 got;
  slowbody    64 clients (each from its own loopback address, 127.0.0.2 and up) announce a
              10 MB body and send one byte every 2 s; meanwhile normal uploads are timed, and
              what the slow clients finally got is recorded;
  bad         each bad input (empty, text, truncated PNG, wrong field, not multipart,
              oversized with and without Content-Length, unknown finding) gets a 4xx and the
              server still answers a real image afterwards.

    python benchmarks/serve_load.py                      # all parts, the bundled model
    python benchmarks/serve_load.py --parts memory,health --json
    python benchmarks/serve_load.py --parts dicombomb,slowbody --json
    python benchmarks/serve_load.py --legacy --src /path/to/old/src --parts throughput,health
        # the same client against a server that predates the load settings (no new flags)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "data" / "nih-mini" / "images"
ORIGINAL = ROOT / "tests" / "data" / "nih-mini" / "originals" / "00000001_000.png"
HOST = "127.0.0.1"


# -- the huge PNG -------------------------------------------------------------------------


def bomb_png(width: int = 7000, height: int = 7000) -> bytes:
    """A flat 16-bit RGBA PNG written row by row with zlib and struct (PIL would need the
    392 MB image in memory first): ~380 KB on disk, 7000 x 7000 x 4 x 2 bytes decoded."""
    row = b"\x00" + bytes(width * 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- the server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, args: argparse.Namespace, backend: str, extra: list[str]) -> None:
        self.port = free_port()
        model = args.model or str(
            ROOT / "src" / "chestxray" / "weights" / ("default.onnx" if backend == "onnx" else "default.safetensors")
        )
        cmd = [sys.executable, "-m", "chestxray.cli", "serve", "--model", model, "--backend", backend,
               "--host", HOST, "--port", str(self.port)]
        if not args.legacy:
            cmd += extra
        env = dict(os.environ)
        if args.src:
            env["PYTHONPATH"] = str(Path(args.src).resolve())
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited early:\n{self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if get(self.port, "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit("the server did not answer /healthz within 180 s")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- the client -----------------------------------------------------------------------------


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:  # loopback only
        return r.status, r.read()


def multipart(data: bytes, field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="upload.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(conn: http.client.HTTPConnection, path: str, body: bytes, ctype: str) -> tuple[int, dict, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def load(port: int, bodies: list[tuple[bytes, str]], n: int, inflight: int, time_cap: float) -> dict:
    """`n` predict requests, `inflight` at a time on keep-alive connections; stops starting new
    ones after `time_cap` seconds."""
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    counter = iter(range(n))
    lock = threading.Lock()
    t0 = time.perf_counter()

    def worker() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        while time.perf_counter() - t0 < time_cap:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, ctype = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                status: int | str = post(conn, "/api/v1/predict", body, ctype)[0]
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - t)
                statuses[status] = statuses.get(status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(inflight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    return {"inflight": inflight, "requests": len(ms), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ms) / wall, 2), "p50_ms": round(percentile(ms, 50), 1),
            "p99_ms": round(percentile(ms, 99), 1), "statuses": statuses}


# -- the parts ------------------------------------------------------------------------------


def part_throughput(args: argparse.Namespace, bodies: list[tuple[bytes, str]]) -> list[dict]:
    out = []
    for backend in args.backends:
        for batching, extra in (("off", ["--max-batch", "1"]), ("on", ["--max-batch", "16", "--max-wait-ms", "5"])):
            if args.legacy and batching == "on":
                continue
            server = Server(args, backend, [*extra, "--queue-length", "64"])
            try:
                load(server.port, bodies, 16, 4, 30)  # warm-up
                for inflight in (1, 8, 32):
                    row = load(server.port, bodies, args.requests, inflight, args.time_cap)
                    out.append({"backend": backend, "batching": "legacy" if args.legacy else batching, **row})
                    print(json.dumps(out[-1]), file=sys.stderr, flush=True)
            finally:
                server.stop()
    return out


def yield_cpu(steps: int = 5) -> None:
    """Run this client thread at a lower priority (Linux: per-thread nice), so that on a
    machine shared with the server the 200 client threads do not starve the server and
    the probe; on a real network the clients are other machines."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except (AttributeError, OSError):
        pass


def burst(port: int, bodies: list[tuple[bytes, str]], clients: int, path: str = "/api/v1/predict") -> dict[str, int]:
    """`clients` uploads sent at the same moment: each client connects first, then all send."""
    ready = threading.Barrier(clients)

    def one(i: int) -> str:
        yield_cpu()
        conn = http.client.HTTPConnection(HOST, port, timeout=300)
        try:
            conn.connect()
            ready.wait(60)
            status, headers, _ = post(conn, path, *bodies[i % len(bodies)])
            return f"{status}{' +Retry-After' if status == 503 and 'retry-after' in headers else ''}"
        except (OSError, http.client.HTTPException, threading.BrokenBarrierError) as exc:
            return type(exc).__name__
        finally:
            conn.close()

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    return {k: results.count(k) for k in sorted(set(results))}


def part_memory(args: argparse.Namespace, bodies: list[tuple[bytes, str]]) -> list[dict]:
    t = time.perf_counter()
    bomb = multipart(bomb_png())
    print(f"built the 7000x7000 16-bit RGBA PNG: {len(bomb[0]) / 1024:.0f} KiB in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    out = []
    configs = [("default settings", [])]
    if not args.legacy:
        configs.append(("--max-decode-mb 512 (the bombs are decoded)", ["--max-decode-mb", "512",
                                                                       "--request-deadline-s", "300"]))
    for label, extra in configs:
        server = Server(args, "torch", extra)
        try:
            load(server.port, bodies, 16, 4, 30)  # warm: the model has run, as on a serving machine
            time.sleep(1)
            idle = server.rss_mb()
            for clients in args.bomb_clients:
                peak = [idle]
                stop = threading.Event()

                def sample(peak: list[float] = peak, stop: threading.Event = stop, server: Server = server) -> None:
                    while not stop.is_set():
                        peak[0] = max(peak[0], server.rss_mb())
                        time.sleep(0.01)

                sampler = threading.Thread(target=sample)
                sampler.start()
                t0 = time.perf_counter()
                answers = burst(server.port, [bomb], clients)
                took = time.perf_counter() - t0
                stop.set()
                sampler.join()
                time.sleep(3)
                after = server.rss_mb()
                out.append({"config": label, "clients": clients, "idle_mb": round(idle), "peak_mb": round(peak[0]),
                            "peak_over_idle_mb": round(peak[0] - idle), "after_3s_mb": round(after),
                            "after_vs_idle_pct": round(100 * (after - idle) / idle, 1), "answers": answers,
                            "burst_s": round(took, 1)})
                print(json.dumps(out[-1]), file=sys.stderr, flush=True)
        finally:
            server.stop()
    return out


def part_health(args: argparse.Namespace, bodies: list[tuple[bytes, str]]) -> dict:
    server = Server(args, "torch", [])
    try:
        load(server.port, bodies, 16, 4, 30)
        # The poller is a process of its own, so that the 200 client threads here do not
        # delay it through this interpreter's GIL.
        poller = subprocess.Popen([sys.executable, __file__, "--poll-healthz", str(server.port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        answers = burst(server.port, bodies, 200)
        polled = json.loads(poller.communicate("stop\n", timeout=60)[0])
        latencies, failures = polled["ms"], polled["failures"]
        slow_at = polled["slow_at_s"]  # the burst starts about 1 s after the poller
        return {"healthz_polls": len(latencies), "healthz_p50_ms": round(percentile(latencies, 50), 1),
                "healthz_p99_ms": round(percentile(latencies, 99), 1), "healthz_max_ms": round(max(latencies), 1), "healthz_slowest_ms": sorted(latencies)[-5:],
                "healthz_over_100ms": sum(x >= 100 for x in latencies),
                "healthz_slow_at_s": slow_at, "load_average": os.getloadavg(),
                "healthz_failures": failures, "burst_answers": answers}
    finally:
        server.stop()


# -- hostile clients: DICOM header bombs, slow bodies ------------------------------------------


def dicom_header_bomb(elements: int = 2_000_000) -> bytes:
    """A Part-10 file (preamble, DICM, file meta in explicit VR little endian) followed by
    `elements` empty private data elements (0009,xxxx) LO and no pixels: 8 bytes each."""

    def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB", b"UN"):
            return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    def ui(uid: str) -> bytes:
        raw = uid.encode()
        return raw + b"\0" * (len(raw) % 2)

    meta = (el(2, 1, b"OB", b"\0\1") + el(2, 2, b"UI", ui("1.2.840.10008.5.1.4.1.1.1"))
            + el(2, 3, b"UI", ui("1.2.3.4")) + el(2, 0x10, b"UI", ui("1.2.840.10008.1.2.1")))
    head = bytes(128) + b"DICM" + el(2, 0, b"UL", struct.pack("<I", len(meta))) + meta
    block = b"".join(struct.pack("<HH2sH", 0x0009, 0x1000 + i, b"LO", 0) for i in range(0xE000))
    return head + (block * (elements // 0xE000 + 1))[: 8 * elements]


def start_poller(port: int) -> subprocess.Popen:
    # A process of its own, so that the client threads here do not delay it through the GIL.
    return subprocess.Popen([sys.executable, __file__, "--poll-healthz", str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def stop_poller(poller: subprocess.Popen) -> dict:
    polled = json.loads(poller.communicate("stop\n", timeout=60)[0])
    ms = polled["ms"] or [float("nan")]
    return {"healthz_polls": len(polled["ms"]), "healthz_p50_ms": round(percentile(ms, 50), 1),
            "healthz_p99_ms": round(percentile(ms, 99), 1), "healthz_max_ms": round(max(ms), 1),
            "healthz_failures": polled["failures"]}


def part_dicom_bombs(args: argparse.Namespace, bodies: list[tuple[bytes, str]]) -> dict:
    bomb = multipart(dicom_header_bomb())
    server = Server(args, "torch", [])
    try:
        load(server.port, bodies, 8, 2, 30)  # warm
        poller = start_poller(server.port)
        time.sleep(1.0)

        def one(_: int) -> tuple[int | str, float]:
            conn = http.client.HTTPConnection(HOST, server.port, timeout=120)
            t = time.perf_counter()
            try:
                status = post(conn, "/api/v1/predict", *bomb)[0]
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
            finally:
                conn.close()
            return status, round(time.perf_counter() - t, 2)

        t = time.perf_counter()
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(one, range(3)))
        took = time.perf_counter() - t
        time.sleep(0.5)
        return {"bomb_mb": round(len(bomb[0]) / 1e6, 1), "bomb_answers": [a[0] for a in answers],
                "bomb_seconds": [a[1] for a in answers], "bombs_in_flight_s": round(took, 2),
                **stop_poller(poller), "load_average": os.getloadavg()}
    finally:
        server.stop()


def part_slow_bodies(args: argparse.Namespace, bodies: list[tuple[bytes, str]], clients: int = 64) -> dict:
    server = Server(args, "torch", [])
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        load(server.port, bodies, 8, 2, 30)  # warm
        for i in range(clients):
            s = socket.socket()
            s.bind((f"127.0.0.{i + 2}", 0))
            s.connect((HOST, server.port))
            s.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
                      b"Content-Type: multipart/form-data; boundary=B\r\n\r\n"
                      b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\n')
            socks.append(s)

        def trickle() -> None:
            while not stop.wait(2.0):
                for s in socks:
                    try:
                        s.send(b"\0")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(1.0)
        normal = []
        for body, ctype in bodies[:5]:
            conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
            t = time.perf_counter()
            try:
                status: int | str = post(conn, "/api/v1/predict", body, ctype)[0]
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
            finally:
                conn.close()
            normal.append((status, round((time.perf_counter() - t) * 1000, 1)))
        slow_answers: dict[str, int] = {}
        t = time.perf_counter()
        for s in socks:  # what each slow client finally got
            s.settimeout(max(0.1, 30 - (time.perf_counter() - t)))
            try:
                line = s.recv(64).split(b"\r\n")[0].decode("latin-1") or "closed"
            except OSError as exc:
                line = type(exc).__name__
            key = line.split(" ")[1] if line.startswith("HTTP/") else line
            slow_answers[key] = slow_answers.get(key, 0) + 1
        return {"slow_clients": clients, "normal_uploads": [n[0] for n in normal],
                "normal_ms": [n[1] for n in normal], "slow_clients_got": slow_answers,
                "slow_clients_answered_within_s": round(time.perf_counter() - t + 1.0, 1),
                "load_average": os.getloadavg()}
    finally:
        stop.set()
        for s in socks:
            s.close()
        server.stop()


def part_bad(args: argparse.Namespace, good: bytes) -> list[dict]:
    server = Server(args, "torch", [])
    truncated = ORIGINAL.read_bytes()[: ORIGINAL.stat().st_size // 3]
    oversized = b"\x89PNG\r\n\x1a\n" + os.urandom(20 * 2**20 + 1024)
    body, ctype = multipart(oversized)
    cases: dict[str, tuple[str, object, str, dict]] = {
        "empty file": ("/api/v1/predict", *multipart(b""), {}),
        "text file": ("/api/v1/predict", *multipart(b"just some text\n" * 100), {}),
        "truncated PNG": ("/api/v1/predict", *multipart(truncated), {}),
        "wrong form field": ("/api/v1/predict", *multipart(good, field="image"), {}),
        "not multipart": ("/api/v1/predict", good, "image/png", {}),
        "oversized": ("/api/v1/predict", body, ctype, {}),
        "oversized, chunked": ("/api/v1/predict", (body[i:i + 2**18] for i in range(0, len(body), 2**18)), ctype,
                               {"encode_chunked": True}),
        "unknown CAM finding": ("/api/v1/cam?finding=Fracture", *multipart(good), {}),
    }
    out = []
    try:
        for name, (path, data, ctype, kw) in cases.items():
            conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
            try:
                conn.request("POST", path, body=data, headers={"Content-Type": ctype}, **kw)  # type: ignore[arg-type]
                r = conn.getresponse()
                status, detail = r.status, json.loads(r.read() or b"{}").get("detail", "")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                status, detail = None, type(exc).__name__
            finally:
                conn.close()
            fresh = http.client.HTTPConnection(HOST, server.port, timeout=60)
            after = post(fresh, "/api/v1/predict", *multipart(good))[0]
            fresh.close()
            out.append({"input": name, "status": status, "detail": str(detail)[:70],
                        "ok": status is not None and 400 <= status < 500, "still_serving": after == 200})
    finally:
        server.stop()
    return out


def poll_healthz(port: int) -> None:
    """GET /healthz every 20 ms until stdin says stop; print the latencies as JSON."""
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    deadline = time.monotonic() + 600
    t_start = time.perf_counter()
    slow: list[float] = []  # when (s after the poller started) a poll took 100 ms or more
    while not stop.is_set() and time.monotonic() < deadline:
        t = time.perf_counter()
        try:
            status = get(port, "/healthz", timeout=30)[0]
            if status != 200:
                failures.append(str(status))
        except OSError as exc:
            failures.append(type(exc).__name__)
        latencies.append(round((time.perf_counter() - t) * 1000, 2))
        if latencies[-1] >= 100:
            slow.append(round(t - t_start, 2))
        time.sleep(0.02)
    print(json.dumps({"ms": latencies, "failures": failures, "slow_at_s": slow}))


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--poll-healthz":
        poll_healthz(int(sys.argv[2]))
        return 0
    # Ctrl-C or kill: leave through the `finally` blocks that stop the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="one model for every backend (default: the bundled .safetensors / .onnx)")
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--parts", default="throughput,memory,health,bad")
    ap.add_argument("--requests", type=int, default=160, help="requests per throughput cell (default 160)")
    ap.add_argument("--time-cap", type=float, default=40.0, help="seconds per throughput cell (default 40)")
    ap.add_argument("--bomb-clients", default="8,40", help="concurrent huge-PNG uploads (default 8,40)")
    ap.add_argument("--src", help="PYTHONPATH for the server (e.g. an older checkout's src)")
    ap.add_argument("--legacy", action="store_true", help="pass the server none of the load flags")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.bomb_clients = [int(x) for x in args.bomb_clients.split(",") if x]
    parts = set(args.parts.split(","))

    images = [p.read_bytes() for p in sorted(IMAGES.glob("*.png"))]
    if not images:
        raise SystemExit(f"no PNG images in {IMAGES}")
    bodies = [multipart(d) for d in images]
    report: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "images": f"{len(images)} real NIH PNGs (256 px) from {IMAGES.relative_to(ROOT)}",
    }
    if "throughput" in parts:
        report["throughput"] = part_throughput(args, bodies)
    if "memory" in parts:
        report["memory"] = part_memory(args, bodies)
    if "health" in parts:
        report["health"] = part_health(args, bodies)
    if "dicombomb" in parts:
        report["dicom_header_bombs"] = part_dicom_bombs(args, bodies)
    if "slowbody" in parts:
        report["slow_bodies"] = part_slow_bodies(args, bodies)
    if "bad" in parts:
        report["bad_inputs"] = part_bad(args, images[0])
    print(json.dumps(report, indent=2 if args.json else None))
    bad = report.get("bad_inputs", [])
    passed = all(b["ok"] and b["still_serving"] for b in bad)  # type: ignore[union-attr,index]
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
