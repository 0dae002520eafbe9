"""The GPU path. On CPU: bf16 autocast and torch.compile (inductor) of the
training step. With a CUDA GPU (`make gpu-check`): the same on CUDA with channels_last, the
on-device augmentation, a short training run, and DDP over NCCL on two GPUs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from chestxray.data.transforms import AugmentConfig, BatchAugment
from chestxray.models.registry import create_model, train_mode
from chestxray.training.loop import autocast_for, training_step


def _batch(n: int = 4, size: int = 32, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g)
    y = (torch.rand(n, 14, generator=g) < 0.2).float()
    return x.to(device), y.to(device)


def _model(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet18", weights="none", freeze="all", image_size=32).to(device)
    train_mode(model)
    return model


def _tiny() -> torch.nn.Module:
    """A few-layer conv net: on 2 CPU cores bf16 emulation and inductor's C++ builds of a
    ResNet take minutes; this exercises the same autocast / compile / step path in seconds."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 14),
    )


def _steps(model: torch.nn.Module, net: torch.nn.Module, autocast, n: int = 2, device: str = "cpu") -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _batch(device=device)
    crit = torch.nn.BCEWithLogitsLoss()
    return [float(training_step(net, opt, crit, x, y, autocast())) for _ in range(n)]


def test_bf16_autocast_training_step_on_cpu():
    cpu = torch.device("cpu")
    model = _tiny()
    with autocast_for(cpu, True):
        assert model(_batch()[0]).dtype == torch.bfloat16  # autocast is really on
    ref_model = _tiny()
    ref = _steps(ref_model, ref_model, contextlib.nullcontext, n=1)
    before = model[0].weight.detach().clone()
    bf16 = _steps(model, model, lambda: autocast_for(cpu, True), n=3)
    assert bf16[0] == pytest.approx(ref[0], abs=0.01)  # bf16 keeps ~3 significant digits
    assert bf16[2] < bf16[0] and not torch.equal(before, model[0].weight)
    assert model[0].weight.dtype == torch.float32  # master weights stay fp32
    assert not autocast_for(cpu, False).__enter__()  # off: a null context


def _has_compiler() -> bool:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return bool(cxx) and headers.is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _has_compiler(), reason="torch.compile on CPU needs a C++ compiler and Python headers")
def test_compiled_training_step_matches_eager_on_cpu():
    torch._dynamo.reset()
    ref_model = _tiny()
    ref = _steps(ref_model, ref_model, contextlib.nullcontext, n=3)
    model = _tiny()
    compiled = _steps(model, torch.compile(model), contextlib.nullcontext, n=3)
    assert compiled == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert compiled[2] < compiled[0]
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-4)
    torch._dynamo.reset()


# ---- CUDA (skipped without a GPU; see tests/conftest.py) -------------------------------------
@contextlib.contextmanager
def _no_tf32():
    """Exact float32 on the GPU: cuDNN's default TF32 convolutions round to 10 bits, and eager
    and compiled graphs pick different algorithms (layouts), so their TF32 results differ by
    ~1e-3, which batch norm over a 1x1 map of 4 images amplifies. Measured on an H100."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.cuda
def test_cuda_bf16_channels_last_step_matches_cpu():
    ref_model = _model()
    ref = _steps(ref_model, ref_model, contextlib.nullcontext, n=3)
    model = _model("cuda").to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _batch(device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    crit = torch.nn.BCEWithLogitsLoss()
    got = [float(training_step(model, opt, crit, x, y, autocast_for(torch.device("cuda"), True))) for _ in range(3)]
    # The first loss is the same forward pass in bf16 vs float32; after that the two runs take
    # different steps (bf16 gradients), so only the trend is compared: both learn the batch.
    assert got[0] == pytest.approx(ref[0], abs=0.02)
    assert got[2] < got[0] and ref[2] < ref[0]
    after = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in after)  # master weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.cuda
def test_cuda_compiled_step_matches_eager():
    with _no_tf32():
        ref_model = _model("cuda")
        ref = _steps(ref_model, ref_model, contextlib.nullcontext, n=3, device="cuda")
        model = _model("cuda")
        got = _steps(model, torch.compile(model), contextlib.nullcontext, n=3, device="cuda")
    # The first loss is one forward pass: equal to 1e-3, as measured on an H100. The steps after
    # it drift apart (0.3% by the third), as batch norm over 4-image 1x1 maps amplifies the
    # compiled graph's different float reduction order; both runs must still learn the batch.
    assert got[0] == pytest.approx(ref[0], rel=1e-3)
    assert got == pytest.approx(ref, rel=1e-2)
    assert got[2] < got[0] and ref[2] < ref[0]


@pytest.mark.cuda
def test_cuda_batch_augment_is_seeded_and_in_range():
    x = _batch(8, 64, "cuda")[0]
    a = BatchAugment(AugmentConfig.preset("strong"), seed=3, device=torch.device("cuda"))
    b = BatchAugment(AugmentConfig.preset("strong"), seed=3, device=torch.device("cuda"))
    out_a, out_b = a(x), b(x)
    assert out_a.device.type == "cuda" and out_a.shape == x.shape
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, x)
    assert float(out_a.min()) >= 0.0 and float(out_a.max()) <= 1.0


@pytest.mark.cuda
def test_cuda_training_run_with_compile(tmp_path, mini_root):
    from chestxray.training.loop import TrainConfig, train

    cfg = TrainConfig(
        root=str(mini_root),
        out=str(tmp_path / "run"),
        model="resnet18",
        weights="none",
        freeze="all",
        epochs=2,
        batch_size=16,
        lr=1e-3,
        image_size=64,
        cache=str(tmp_path / "cache"),
        device="cuda",
        val_fraction=0.3,
        compile=True,
        augment="strong",
        workers=1,
    )
    bundle = train(cfg)
    assert bundle is not None and bundle.is_file() and (tmp_path / "run" / "curves.png").is_file()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs")
def test_ddp_nccl_two_gpus(tmp_path, mini_root):
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    report = tmp_path / "report"
    report.mkdir()
    from chestxray.data.cache import prepare_cache
    from chestxray.data.index import load_nih

    prepare_cache(list(load_nih(mini_root).iter_paths()), tmp_path / "cache", 32, workers=1, progress=False)
    env = dict(os.environ, CHESTXRAY_DDP_DEVICE="cuda", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        port,
        str(Path(__file__).parent / "ddp_worker.py"),
        str(tmp_path / "run"),
        str(tmp_path / "cache"),
        str(mini_root),
        str(report),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["weights"] == r1["weights"] and r0["val_loss"] == pytest.approx(r1["val_loss"])


@pytest.mark.cuda
def test_cuda_bulk_predict_pinned_side_stream_matches_cpu(tiny_bundle, mini_root, tmp_path):
    """Bulk predict on CUDA (pinned buffers, copies on a side stream overlapping compute)
    gives the CPU's probabilities, in input order, with broken files still error rows."""
    from chestxray.inference.inputs import InputFile
    from chestxray.inference.predict import Analyzer

    files = sorted((mini_root / "images").glob("*.png"))[:23]  # 6 batches of 4, the last short
    broken = tmp_path / "not-an-image.png"
    broken.write_bytes(b"not a PNG")
    inputs = [InputFile.of(str(f)) for f in files]
    inputs.insert(5, InputFile.of(str(broken)))

    def run(device: str, workers: int) -> list:
        a = Analyzer.load(tiny_bundle, backend="torch", device=device)
        return list(a.predict_files(iter(inputs), workers=workers, batch_size=4))

    cpu = run("cpu", 0)
    for workers in (0, 2):
        gpu = run("cuda", workers)
        assert [f.path for f, _ in gpu] == [f.path for f, _ in cpu]
        for (_, p), (_, q) in zip(gpu, cpu):
            assert (p.error is None) == (q.error is None)
            if p.error is None:
                got = {x.finding: x.probability for x in p.findings}
                want = {x.finding: x.probability for x in q.findings}
                assert got == pytest.approx(want, abs=2e-3)  # cuDNN's TF32 convolutions
    assert sum(p.error is not None for _, p in cpu) == 1
