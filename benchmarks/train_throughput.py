"""Training throughput, side by side in one run:

  model-bound : the training step on a batch already on the device (float, no data path)
  end-to-end  : the same step fed by the real data path: uint8 images in host memory ->
                CacheBatches (background gather, pinned copy) -> to_model_input -> on-device
                augmentation -> step

Both use `chestxray.training.loop.training_step`, so the gap is what the data path costs.

  python benchmarks/train_throughput.py                      # CPU, resnet50 at 224, batch 16
  python benchmarks/train_throughput.py --device cuda --batch-size 256 --steps 50 [--compile]
  python benchmarks/train_throughput.py --cache DIR           # read a real prepared cache
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import numpy as np
import torch

from chestxray.data.loader import CacheBatches, to_model_input
from chestxray.data.transforms import AugmentConfig, BatchAugment
from chestxray.models.registry import create_model, train_mode
from chestxray.training.loop import autocast_for, training_step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--freeze", default="seed", choices=["seed", "all", "head"])
    p.add_argument("--augment", default="strong", choices=["none", "seed", "strong"])
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--cache", default=None, help="prepared cache folder (uses its SIZE subfolder); "
                   "default: synthetic uint8 images in host memory")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    model = create_model(args.model, weights="none", freeze=args.freeze, image_size=args.image_size).to(device)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    train_mode(model)
    net = torch.compile(model) if args.compile else model
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    crit = torch.nn.BCEWithLogitsLoss()
    amp = functools.partial(autocast_for, device, gpu and args.amp)  # the training loop's own bf16 policy
    aug_cfg = AugmentConfig.preset(args.augment)
    augment = BatchAugment(aug_cfg, seed=0, device=device) if aug_cfg else None
    s, b = args.image_size, args.batch_size

    if args.cache:
        from chestxray.data.cache import PreparedCache

        cache = PreparedCache.open(args.cache, s)
        images = np.asarray(cache.images[: max(b * (args.steps + args.warmup), b)])
        source = f"prepared cache {cache.folder} ({len(images)} images)"
    else:
        n = b * (args.steps + args.warmup)
        images = np.random.default_rng(0).integers(0, 256, (n, s, s), dtype=np.uint8)
        source = f"synthetic uint8 images in host memory ({n})"
    labels = (np.random.default_rng(1).random((len(images), 14)) < 0.1).astype(np.float32)

    def channels(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if gpu else x

    # Model-bound: one device-resident batch, augmented once up front, stepped repeatedly.
    x_dev = channels(to_model_input(torch.from_numpy(images[:b]).to(device)))
    y_dev = torch.from_numpy(labels[:b]).to(device)
    for _ in range(args.warmup):
        training_step(net, opt, crit, x_dev, y_dev, amp())
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        training_step(net, opt, crit, x_dev, y_dev, amp())
    sync(device)
    bound = b * args.steps / (time.perf_counter() - t0)

    # End to end: the loader, conversion and augmentation of the training loop.
    batches = CacheBatches(images, labels, b, shuffle=True, seed=0, drop_last=True, device=device)
    it = iter(batches)
    for _ in range(args.warmup):
        _, xb, yb = next(it)
        x = channels(to_model_input(xb))
        training_step(net, opt, crit, augment(x) if augment else x, yb, amp())
    sync(device)
    t0 = time.perf_counter()
    done = 0
    for _, xb, yb in it:
        x = channels(to_model_input(xb))
        training_step(net, opt, crit, augment(x) if augment else x, yb, amp())
        done += len(yb)
    sync(device)
    e2e = done / (time.perf_counter() - t0)

    machine = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = {
        "machine": machine, "model": args.model, "image_size": s, "batch_size": b, "freeze": args.freeze,
        "augment": args.augment, "amp_bf16": bool(gpu and args.amp), "compile": args.compile, "source": source,
        "model_bound_img_s": round(bound, 2), "end_to_end_img_s": round(e2e, 2),
        "end_to_end_vs_bound": round(e2e / bound, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{machine}; {args.model} {s}px, batch {b}, freeze={args.freeze}, augment={args.augment}, "
          f"bf16={result['amp_bf16']}, compile={args.compile}; data: {source}")
    print("| path | images/s |\n|---|---:|")
    print(f"| model-bound (device-resident batch) | {bound:,.1f} |")
    print(f"| end to end (cache -> loader -> augment -> step) | {e2e:,.1f} ({e2e / bound:.1%} of bound) |")


if __name__ == "__main__":
    main()
