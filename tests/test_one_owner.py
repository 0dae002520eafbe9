"""One owner per concept in the data and training code: read from the source, so a copy that
creeps back in fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import chestxray

PACKAGE = Path(chestxray.__file__).parent


def _sources(folder: Path) -> dict[Path, str]:
    return {p: p.read_text() for p in folder.rglob("*.py")}


def test_file_hashes_come_from_io():
    # A helper that hashes a file, other than io.file_sha256 (hashing a short name is another concept).
    copies = [p for p, text in _sources(PACKAGE).items() if re.search(r"def \w*sha256", text) and p.name != "io.py"]
    assert copies == []


def test_dataset_readers_share_one_index_tail():
    readers = _sources(PACKAGE / "data" / "datasets")
    assert [p.name for p, text in readers.items() if "check_images(" in text or "locate_images(" in text] == []
    # The table readers end in common.finish_index (mimic through chexpert.finish_table).
    tail = sorted(p.name for p, text in readers.items() if "finish_index(" in text or "finish_table(" in text)
    assert tail == ["chexpert.py", "mimic.py", "padchest.py", "table.py", "vindr.py"]


def test_reader_registry_imports_readers_on_first_use():
    code = (
        "import sys, importlib; from chestxray.data.datasets import READERS; "
        "assert not any(m.endswith(('.padchest', '.table', '.chexpert')) for m in sys.modules); "
        "[getattr(importlib.import_module('chestxray.data.datasets.' + r.function.split(':')[0]), "
        "r.function.split(':')[1]) for r in READERS.values()]"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_process_group_plumbing_is_not_a_model():
    from chestxray.inference import distributed as low
    from chestxray.training import distributed as high

    assert not (PACKAGE / "models" / "distributed.py").exists()
    assert high.DistInfo is low.DistInfo and high.init_distributed is low.init_distributed
