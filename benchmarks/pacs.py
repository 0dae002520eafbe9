"""PACS round trip: N chest radiographs Orthanc -> `chestxray listen` -> Orthanc (SRs), on the
ONNX backend, next to `chestxray predict` on the same instances in the same run.

    python benchmarks/pacs.py [--count 100] [--images DIR] [--size 1024] [--no-floor]

Starts a private Orthanc (Debian `orthanc` + `orthanc-dicomweb`, as the tests do, with DCMTK's
TCP_NODELAY=1), makes --count DX instances from real NIH radiographs (each its own study),
C-STOREs them into Orthanc, starts the listener, then asks Orthanc to send them all to it (one
REST call, `/modalities/.../store`) and times until every study holds its SR. Reports
instances/s (Orthanc's store request to the last SR stored, and first receipt to the last SR
stored) and latency p50/p95 from receipt to results stored (the listener's journal).

The "floor" round trip (skip with --no-floor) runs the same with the model replaced by a fixed
answer (the first instance's findings, repeated): no decoding, no inference, everything else
as is (DICOM networking, spool, SR encoding, Orthanc). It shows what the round trip costs on
this machine before any analysis.

Then `chestxray predict DIR --backend onnx` on the same files (process wall time, and the rate
without its start-up: the time of a 1-file run subtracted); and, for scale, how many instances
per second Orthanc stores when the 100 are C-STOREd into it (20 per association).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Orthanc and DX helpers of the PACS tests

from pacs_fixtures import (  # noqa: E402
    c_store,
    make_dx,
    orthanc_missing,
    start_listener,
    start_orthanc,
    stop_orthanc,
)

IMAGES = [Path("/work/shared/nih-sample/images"), REPO / "tests" / "data" / "nih-mini" / "images"]

# `python -c` entry of the floor listener: the CLI with Engine.analyse answering every
# instance with the first one's findings.
FLOOR_ENTRY = """
import sys
from chestxray.pacs.engine import Engine
analyse = Engine.analyse
def fixed(self, files, names):
    if not hasattr(self, "fixed_answer"):
        self.fixed_answer = next(analyse(self, files[:1], names[:1]))
    for _ in files:
        yield self.fixed_answer
Engine.analyse = fixed
from chestxray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def predict_seconds(paths: list[Path], out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "chestxray.cli", "predict", *map(str, paths), "--backend", "onnx"]
    t = time.perf_counter()
    subprocess.run(
        [*cmd, "--format", "json", "--out", str(out), "--no-progress"], check=True, env=env, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - t


def round_trip(instances: list[Any], tmp: Path, entry: tuple[str, ...]) -> dict[str, float]:
    """A fresh Orthanc holding `instances`, sent to a fresh listener; the figures of one run."""
    orthanc = start_orthanc(tmp / "orthanc")
    listener = None
    try:
        t_in = time.perf_counter()
        for start in range(0, len(instances), 20):
            part = instances[start : start + 20]
            assert c_store("127.0.0.1", orthanc.dicom_port, "ORTHANC", part) == [0] * len(part)
        ingest = len(instances) / (time.perf_counter() - t_in)  # what Orthanc stores per second, alone
        ids = orthanc.get("/instances")
        dest = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        listener = start_listener(tmp, "--send-to", dest, entry=entry)
        orthanc.add_modality("chestxray", "CHESTXRAY", listener.port)
        t0 = time.perf_counter()
        start_wall = time.time()
        orthanc.call("POST", "/modalities/chestxray/store", {"Resources": ids, "Synchronous": False})

        def srs() -> int:
            # Orthanc's running count (cheap), not a /tools/find over every instance each poll,
            # which would load the PACS the round trip is waiting on.
            return int(orthanc.get("/statistics")["CountInstances"]) - len(instances)

        while srs() < len(instances):
            if time.perf_counter() - t0 > 1800:
                raise RuntimeError("timed out waiting for the SRs:\n" + listener.text()[-2000:])
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        end_wall = start_wall + wall
        listener.stop()
        rows = (
            sqlite3.connect(listener.spool / "journal.sqlite")
            .execute("select received, done from instances where state='sent'")
            .fetchall()
        )
        lat = sorted(d - r for r, d in rows)
        received = sorted(r for r, _ in rows)
        return {
            "orthanc_c_store_ingest_instances_per_s": round(ingest, 2),
            "instances_per_s": round(len(instances) / wall, 2),
            # From the first instance in to the last SR stored: without Orthanc's job start.
            "instances_per_s_from_first_receipt": round(len(instances) / max(1e-6, end_wall - received[0]), 2),
            "latency_p50_s": round(statistics.median(lat), 2),
            "latency_p95_s": round(lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))], 2),
            # How fast Orthanc handed the instances over (first to last receipt).
            "receipt_instances_per_s": round((len(received) - 1) / max(1e-6, received[-1] - received[0]), 2),
        }
    finally:
        if listener is not None:
            listener.stop()
        stop_orthanc(orthanc)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--images", type=Path, default=next((p for p in IMAGES if p.is_dir()), IMAGES[-1]))
    ap.add_argument("--size", type=int, default=0, help="resize to SIZE px (0: as is)")
    ap.add_argument("--no-floor", action="store_true", help="skip the round trip with the model replaced")
    args = ap.parse_args()
    if orthanc_missing():
        sys.exit(orthanc_missing())
    pngs = sorted(args.images.glob("*.png"))
    pngs = [pngs[i % len(pngs)] for i in range(args.count)]
    tmp = Path(tempfile.mkdtemp(prefix="chestxray-pacs-bench-"))
    instances = [make_dx(p, size=args.size or None) for p in pngs]
    folder = tmp / "dcm"
    folder.mkdir()
    for i, ds in enumerate(instances):
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    listener = round_trip(instances, tmp / "listener", ("-m", "chestxray.cli"))
    floor = None if args.no_floor else round_trip(instances, tmp / "floor", ("-c", FLOOR_ENTRY))
    files = sorted(folder.glob("*.dcm"))
    startup = predict_seconds(files[:1], tmp / "one.json")
    full = predict_seconds(files, tmp / "all.json")
    predict_rate = len(files) / full
    predict_rate_warm = (len(files) - 1) / max(1e-6, full - startup)
    result: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "instances": len(instances),
        "image_px": f"{instances[0].Rows}x{instances[0].Columns}",
        "listener": listener,
        "predict_wall_s": round(full, 2),
        "predict_instances_per_s": round(predict_rate, 2),
        "predict_instances_per_s_without_startup": round(predict_rate_warm, 2),
        "listener_over_predict": round(listener["instances_per_s"] / predict_rate, 2),
        "listener_from_first_receipt_over_predict": round(
            listener["instances_per_s_from_first_receipt"] / predict_rate, 2
        ),
    }
    if floor is not None:
        result["floor_without_analysis"] = floor
        result["floor_over_predict"] = round(floor["instances_per_s"] / predict_rate, 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
