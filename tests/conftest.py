"""Shared fixtures. Tests use the repository's real NIH subset and never the network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# A real Orthanc and DX instances for the PACS tests.
pytest_plugins = ["pacs_fixtures"]

DATA = Path(__file__).parent / "data"
MINI_ROOT = DATA / "nih-mini"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to download (torch.hub, torchvision weights) fails loudly."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("TORCH_HOME", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "chestxray-test-torch-home"))


@pytest.fixture(scope="session")
def mini_root() -> Path:
    return MINI_ROOT


@pytest.fixture(scope="session")
def original_png() -> Path:
    """A real untouched 1024 x 1024 NIH original (gray)."""
    return MINI_ROOT / "originals" / "00000001_000.png"


@pytest.fixture(scope="session")
def rgba_png() -> Path:
    """A real NIH original that ships as RGBA."""
    return MINI_ROOT / "originals" / "00001369_000.png"


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    return sorted((MINI_ROOT / "images").glob("*.png"))[:6]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A small real bundle (resnet18 at 64 px, random weights, seeded) for fast tests of
    prediction, serving and export. Thresholds vary per class so tests can see them."""
    import torch

    from chestxray.labels import FINDINGS
    from chestxray.models.bundle import BundleMeta, save_bundle
    from chestxray.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", weights="none", freeze="all", image_size=64).eval()
    thresholds = list(np.linspace(0.3, 0.7, len(FINDINGS)))
    meta = BundleMeta(
        architecture="resnet18",
        labels=list(FINDINGS),
        preprocessing=model.preprocessing,
        thresholds=thresholds,
        name="tiny-test-model",
        training={"data": "none (random weights, for tests)"},
    )
    return save_bundle(model, meta, tmp_path_factory.mktemp("bundle") / "tiny.safetensors")


def pytest_collection_modifyitems(config, items):
    """`cuda`-marked tests need a CUDA GPU: skipped, saying so, where there is none."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    try:
        import torch

        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if not available:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a machine with one)")
        for item in marked:
            item.add_marker(skip)


# ---- shared by several test modules (request them; none is autouse) ----------------------------


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op torch thread for a module's tests, restored afterwards: on the test machine's
    2 shared cores, oversubscription makes tiny convolutions many times slower. Modules opt in
    with `pytestmark = pytest.mark.usefixtures("single_torch_thread")`."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
