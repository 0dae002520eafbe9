"""Data loading speed per CPU core, side by side in one run, on real NIH originals:

  (a) `prepare`: decode an original (1024 px PNG, gray or RGBA), antialiased resize to
      224, store in the uint8 memmap cache (one worker process = one core);
  (b) cache batches from the memmap: the training loop's `CacheBatches` over
      `MemmapImages` (the loader a split too big for memory trains with, `--loader memmap`):
      shuffled batches of 64 rows read from the cache memmap (ascending rows per batch) and
      turned into the float (B, 1, 224, 224) tensor the model takes;
  (c) seed-style loader: per sample PIL open, convert, torchvision Resize(224) and
      ToTensor, then stacked into batches, on the same originals;
  (b') the same `CacheBatches` with the split held in RAM (`--loader ram`), side by side.

Rounds are interleaved so that load from other processes hits every loader alike; the
table gives the median round. Every figure is for one core (torch limited to one thread,
prepare with one worker); (a) is also run with all cores.

    python benchmarks/loader.py [--originals DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEFAULT_ORIGINALS = Path("/work/shared/nih-sample/originals")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--originals", default=str(DEFAULT_ORIGINALS),
                   help=f"folder of real full-size radiographs (default {DEFAULT_ORIGINALS}; "
                        "the repo's tests/data/nih-mini/originals has 3)")
    p.add_argument("--size", type=int, default=224, help="model input side (default 224)")
    p.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--cache-rows", type=int, default=4096,
                   help="rows of the cache read in (b): the prepared originals tiled (default 4096)")
    p.add_argument("--batches", type=int, default=40, help="cache batches per round in (b) (default 40)")
    p.add_argument("--prepare-repeat", type=int, default=4,
                   help="(a) prepares each original this many times under distinct names, so the "
                        "process pool's start-up is amortised as on a real dataset (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    return p.parse_args(argv)


def time_it(fn: Callable[[], int]) -> float:
    """Images per second of one call of `fn` (which returns how many images it handled)."""
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from chestxray.data.cache import PreparedCache, prepare_cache
    from chestxray.data.loader import CacheBatches, MemmapImages, to_model_input

    torch.set_num_threads(1)
    originals = sorted(p for p in Path(args.originals).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not originals:
        print(f"no images in {args.originals}", file=sys.stderr)
        return 2
    items = [(p.name, p) for p in originals]
    prep_items = [(f"{k}-{p.name}", p) for k in range(args.prepare_repeat) for p in originals]
    modes = sorted({f"{Image.open(p).mode} {Image.open(p).size[0]}px" for p in originals})
    work = Path(tempfile.mkdtemp(prefix="chestxray-loader-bench-"))

    def prepare(workers: int) -> Callable[[], int]:
        def run() -> int:
            folder = work / f"prep-{workers}"
            report = prepare_cache(prep_items, folder, size=args.size, workers=workers, progress=False)
            assert report.decoded == len(prep_items) and not report.failed, report.failed
            for f in (folder / str(args.size)).iterdir():  # next round starts from scratch
                f.unlink()
            return report.decoded
        return run

    # (b) needs a cache: the prepared originals, tiled to a training-sized memmap.
    prepare_cache(items, work / "seed", size=args.size, workers=1, progress=False)
    small = PreparedCache.open(work / "seed", args.size)
    big = np.lib.format.open_memmap(work / "rows.npy", mode="w+", dtype=np.uint8,
                                    shape=(args.cache_rows, args.size, args.size))
    big[:] = np.resize(np.asarray(small.images), big.shape)
    big.flush()
    del big
    memmap = np.load(work / "rows.npy", mmap_mode="r")
    labels = np.zeros((len(memmap), 14), np.float32)
    from_disk = CacheBatches(MemmapImages([(memmap, np.arange(len(memmap)))]), labels, args.batch,
                             shuffle=True, seed=0, prefetch=0)
    in_ram = CacheBatches(np.array(memmap), labels, args.batch, shuffle=True, seed=0, prefetch=0)

    def batches(loader: CacheBatches) -> Callable[[], int]:
        def run() -> int:
            n = 0
            for step, (_, xb, _) in enumerate(loader):
                n += to_model_input(xb).shape[0]
                if step + 1 == args.batches:
                    break
            return n
        return run

    seed_tf = T.Compose([T.Resize((args.size, args.size)), T.ToTensor()])

    def seed_style() -> int:
        batch: list[torch.Tensor] = []
        for p in originals:
            with Image.open(p) as img:
                batch.append(seed_tf(img.convert("L")))
            if len(batch) == args.batch:
                torch.stack(batch)
                batch = []
        if batch:
            torch.stack(batch)
        return len(originals)

    loaders: dict[str, Callable[[], int]] = {
        "(a) prepare: decode + resize + cache, 1 worker": prepare(1),
        f"(a) prepare: same, {os.cpu_count()} workers (all cores)": prepare(os.cpu_count() or 1),
        f"(b) training CacheBatches from the cache memmap (--loader memmap), batch {args.batch}": batches(from_disk),
        f"(b') training CacheBatches, split in RAM (--loader ram), batch {args.batch}": batches(in_ram),
        "(c) seed-style: PIL open/convert, Resize, ToTensor per sample": seed_style,
    }
    for fn in loaders.values():  # warm-up: imports, page cache, worker start paths
        fn()
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(args.rounds):
        for name, fn in loaders.items():
            rates[name].append(time_it(fn))
    median = {k: statistics.median(v) for k, v in rates.items()}
    seed_rate = median["(c) seed-style: PIL open/convert, Resize, ToTensor per sample"]

    print(f"{len(originals)} originals from {args.originals} ({', '.join(modes)}); {args.size} px; "
          f"(a) {len(prep_items)} decodes per round; "
          f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}; torch threads 1; "
          f"median of {args.rounds} interleaved rounds\n")
    print("| loader | images/s | per core | vs seed-style (per core) |")
    print("| --- | ---: | ---: | ---: |")
    for name, rate in median.items():
        cores = os.cpu_count() or 1 if "all cores" in name else 1
        per_core = rate / cores
        print(f"| {name} | {rate:,.0f} | {per_core:,.0f} | {per_core / seed_rate:,.1f}x |")
    for f in sorted(work.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
