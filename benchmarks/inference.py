"""Inference speed on this CPU: PyTorch eager vs onnxruntime float32 vs onnxruntime int8,
side by side in one run; and the int8 acceptance check (`--compare-auroc ROOT`).

Speed (default):
    python benchmarks/inference.py [--model BUNDLE]
  - images/s at batch 16 and single-image latency (model only, on real radiographs that
    went through the eval preset), the three backends interleaved round by round so that
    load from other processes hits them alike;
  - wall time of one `chestxray predict IMAGE --format json` from a cold start (a new
    process: imports, model load, image read, inference) for each backend.
  Without --model it builds a ResNet-50 bundle at 224 px with random weights (speed does
  not depend on the weights) and says so.

int8 acceptance (needs the real trained bundle and a labelled NIH root):
    python benchmarks/inference.py --model BUNDLE --compare-auroc ROOT
  exports float32 and int8 (calibrated on images of ROOT's train split, never its test
  split), then reports per-class and mean AUROC on ROOT's official test split for PyTorch,
  ONNX float32 and ONNX int8. int8 is kept only if it loses at most 0.005 mean AUROC
  against float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO / "tests" / "data" / "nih-mini" / "images"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="bundle (default: ResNet-50 at 224 px with random weights, built here)")
    p.add_argument("--onnx", help="use this float32 ONNX file instead of exporting the bundle")
    p.add_argument("--int8-onnx", help="use this int8 ONNX file instead of quantizing")
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="real radiographs to time on and calibrate with")
    p.add_argument("--calibration-count", type=int, default=64, help="int8 calibration images (default 64)")
    p.add_argument("--calibration-method", choices=("minmax", "percentile", "entropy"), default="minmax",
                   help="int8 activation ranges (default minmax; try percentile if int8 loses too much AUROC)")
    p.add_argument("--batch", type=int, default=16, help="batch size for the throughput figure (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--single-runs", type=int, default=10, help="single-image runs per round (default 10)")
    p.add_argument("--cold-runs", type=int, default=3, help="cold-start CLI runs per backend (default 3)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads for both PyTorch and onnxruntime (default 0: each library's own default)")
    p.add_argument("--no-cold-start", action="store_true", help="skip the CLI cold-start timing")
    p.add_argument("--compare-auroc", metavar="ROOT", help="int8 acceptance: AUROC on ROOT's test split")
    p.add_argument("--split", default="test", help="split for --compare-auroc (default test)")
    p.add_argument("--workdir", help="keep exported files here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def build_random_resnet50(folder: Path) -> Path:
    import torch

    from chestxray.labels import FINDINGS
    from chestxray.models.bundle import BundleMeta, save_bundle
    from chestxray.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("resnet50", weights="none", freeze="all", image_size=224).eval()
    meta = BundleMeta(
        architecture="resnet50", labels=list(FINDINGS), preprocessing=model.preprocessing,
        thresholds=[0.5] * len(FINDINGS), name="resnet50-random-benchmark",
        training={"data": "none: random weights, for speed measurements only"},
    )
    return save_bundle(model, meta, folder / "resnet50-random.safetensors")


def prepare_models(args: argparse.Namespace, work: Path, calibration) -> tuple[Path, Path, Path, bool]:
    from chestxray.export.onnx import export_bundle

    random_weights = args.model is None
    if random_weights:
        log("no --model: building a ResNet-50 bundle at 224 px with RANDOM weights (speed does not depend on them)")
        bundle = build_random_resnet50(work)
    else:
        bundle = Path(args.model)
    fp = Path(args.onnx) if args.onnx else None
    if fp is None:
        fp = work / "model.onnx"
        t = time.perf_counter()
        r = export_bundle(bundle, fp, say=log)
        log(f"float32 export {time.perf_counter() - t:.0f} s")
    q = Path(args.int8_onnx) if args.int8_onnx else None
    if q is None:
        q = work / "model.int8.onnx"
        t = time.perf_counter()
        r = export_bundle(bundle, q, int8=True, calibration=calibration,
                          calibration_count=args.calibration_count, calibration_method=args.calibration_method,
                          say=log)
        log(f"int8 export {time.perf_counter() - t:.0f} s ({r.bytes / 1e6:.0f} MB)")
    return bundle, fp, q, random_weights


def time_backends(backends: dict, images: np.ndarray, batch: int, rounds: int, single_runs: int) -> dict:
    """Median images/s at `batch` and median single-image latency, interleaved by round."""
    reps = int(np.ceil(batch / len(images)))
    x = np.concatenate([images] * reps)[:batch]
    one = images[:1]
    for b in backends.values():  # warm up (first runs allocate and pick kernels)
        b.probabilities(x)
        b.probabilities(one)
    tput = {n: [] for n in backends}
    lat = {n: [] for n in backends}
    for r in range(rounds):
        for name, b in backends.items():
            t = time.perf_counter()
            b.probabilities(x)
            tput[name].append(batch / (time.perf_counter() - t))
            for _ in range(single_runs):
                t = time.perf_counter()
                b.probabilities(one)
                lat[name].append((time.perf_counter() - t) * 1000)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {tput[n][-1]:.1f} img/s" for n in backends))
    return {
        n: {"images_per_s": statistics.median(tput[n]), "latency_ms": statistics.median(lat[n]),
            "latency_p90_ms": float(np.percentile(lat[n], 90))}
        for n in backends
    }


def chestxray_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "chestxray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "chestxray.cli"]


def cold_start(commands: dict[str, list[str]], runs: int) -> dict:
    """Median wall time of whole `chestxray predict` processes, interleaved by run."""
    times: dict[str, list[float]] = {n: [] for n in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            dt = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            json.loads(proc.stdout)  # it really printed findings
            times[name].append(dt)
    return {n: {"seconds": statistics.median(v), "runs": v} for n, v in times.items()}


def speed(args: argparse.Namespace, work: Path) -> dict:
    from chestxray.data.images import read_image
    from chestxray.data.transforms import EvalPreset
    from chestxray.inference.onnx_backend import OnnxBackend
    from chestxray.inference.predict import TorchBackend, collect_inputs
    from chestxray.models.bundle import load_bundle

    bundle, fp, q, random_weights = prepare_models(args, work, args.images)
    model, meta = load_bundle(bundle)
    # A bundle this script built earlier (--model with --workdir files) says so in its metadata.
    random_weights = random_weights or str(meta.training.get("data", "")).startswith("none")
    files = collect_inputs([args.images])[: args.batch]
    images = EvalPreset(meta.preprocessing).batch([read_image(f) for f in files])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    threads = args.threads or None
    backends = {"pytorch-eager": TorchBackend(model), "onnxruntime-fp32": OnnxBackend(fp, threads=threads),
                "onnxruntime-int8": OnnxBackend(q, threads=threads)}
    result = {
        "model": {"bundle": str(bundle), "architecture": meta.architecture, "size": meta.preprocessing.size,
                  "random_weights": random_weights,
                  "bytes": {"bundle": bundle.stat().st_size, "onnx-fp32": fp.stat().st_size,
                            "onnx-int8": q.stat().st_size}},
        "machine": {**machine(), "threads_flag": args.threads},
        "batch": args.batch,
        "model_only": time_backends(backends, images, args.batch, args.rounds, args.single_runs),
    }
    if not args.no_cold_start:
        del backends, model
        image = str(files[0])
        base = [*chestxray_cmd(), "predict", "--format", "json"]
        cmds = {
            "pytorch-eager": [*base, "--backend", "torch", "--model", str(bundle), image],
            "onnxruntime-fp32": [*base, "--backend", "onnx", "--model", str(fp), image],
            "onnxruntime-int8": [*base, "--backend", "onnx", "--model", str(q), image],
        }
        result["cold_start_predict"] = cold_start(cmds, args.cold_runs)
    return result


def compare(args: argparse.Namespace, work: Path) -> dict:
    from chestxray.data.index import load_nih
    from chestxray.export.quantize import AUROC_BUDGET, calibration_images, compare_auroc
    from chestxray.inference.predict import Analyzer

    if args.model is None:
        log("WARNING: no --model, so this compares a RANDOM-weights ResNet-50; pass the trained bundle")
    calibration: list[Path] = []
    if not args.int8_onnx:
        index = load_nih(args.compare_auroc, allow_missing=True)
        train = [Path(p) for p in index.frame["path"].iloc[index.split_positions("train")]]
        calibration = calibration_images(train, args.calibration_count)
        log(f"int8 is calibrated on {len(calibration)} images of the train split of {args.compare_auroc}")
    bundle, fp, q, random_weights = prepare_models(args, work, calibration)
    analyzers = {
        "onnx-fp32": Analyzer.load(fp, backend="onnx"),
        "onnx-int8": Analyzer.load(q, backend="onnx"),
        "pytorch": Analyzer.load(bundle, backend="torch"),
    }
    cmp = compare_auroc(analyzers, args.compare_auroc, split=args.split, reference="onnx-fp32", progress=True)
    out = cmp.to_dict()
    out.update({"bundle": str(bundle), "random_weights": random_weights, "root": args.compare_auroc,
                "split": args.split, "calibration_images": len(calibration), "budget": AUROC_BUDGET})
    return out


def print_speed(r: dict) -> None:
    m, mach = r["model"], r["machine"]
    note = " (RANDOM weights: speed does not depend on them)" if m["random_weights"] else ""
    print(f"model: {m['architecture']} at {m['size']} px{note}; {m['bundle']}")
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads), "
          f"onnxruntime {mach['onnxruntime']} ({mach['threads_flag'] or 'default:'} threads"
          f"{' one per physical core' if not mach['threads_flag'] else ''}), "
          f"load average at start {[round(v, 2) for v in mach['load_average'] or []]}")
    print()
    print(f"| backend | images/s at batch {r['batch']} | single-image latency (median / p90) | file | "
          "cold `chestxray predict` |")
    print("| --- | ---: | ---: | ---: | ---: |")
    files = {"pytorch-eager": "bundle", "onnxruntime-fp32": "onnx-fp32", "onnxruntime-int8": "onnx-int8"}
    for name, t in r["model_only"].items():
        cold = r.get("cold_start_predict", {}).get(name)
        cold_s = f"{cold['seconds']:.2f} s" if cold else "-"
        print(f"| {name} | {t['images_per_s']:.1f} | {t['latency_ms']:.1f} / {t['latency_p90_ms']:.1f} ms | "
              f"{m['bytes'][files[name]] / 1e6:.0f} MB | {cold_s} |")
    base = r["model_only"]["pytorch-eager"]
    for name in ("onnxruntime-fp32", "onnxruntime-int8"):
        t = r["model_only"][name]
        print(f"{name}: {t['images_per_s'] / base['images_per_s']:.2f}x PyTorch throughput, "
              f"{base['latency_ms'] / t['latency_ms']:.2f}x faster single image")


def print_compare(r: dict) -> None:
    names = list(r["mean_auroc"])
    cal = (f"int8 calibrated on {r['calibration_images']} train-split images" if r["calibration_images"]
           else "int8 file given")
    print(f"AUROC on the {r['split']} split of {r['root']} ({r['images']} images); {cal}"
          + ("; RANDOM weights" if r["random_weights"] else ""))
    print("| finding | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for i, lab in enumerate(r["labels"]):
        vals = [r["per_class_auroc"][n][i] for n in names]
        print(f"| {lab} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in vals) + " |")
    print("| **mean** | " + " | ".join(f"**{r['mean_auroc'][n]:.4f}**" for n in names) + " |")
    loss = r["loss_vs_reference"]["onnx-int8"]
    verdict = "KEEP int8" if r["keep"]["onnx-int8"] else "DROP int8 (ship float32 only)"
    print(f"mean AUROC lost by int8 against float32: {loss:+.4f} (budget {r['budget']}): {verdict}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chestxray-bench-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = compare(args, work) if args.compare_auroc else speed(args, work)
    result["command"] = "python benchmarks/inference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.compare_auroc:
        print_compare(result)
    else:
        print_speed(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
