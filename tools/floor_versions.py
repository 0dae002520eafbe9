"""Print `name==floor` for the light dependencies declared in pyproject.toml, for the
floor-versions check (`make floors`): the lowest versions the project claims to support.

Only the torch-free install is pinned to its floors (core, `infer`, `serve`, `pacs`, and the test
tools): torch, torchvision and the rest of the `torch` extra stay out, since other torch
builds are multi-GB downloads and this workplace keeps only torch 2.14.1 on disk.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    sys.exit("floor_versions.py needs Python 3.11+ (tomllib) to read pyproject.toml")

EXTRAS = ("infer", "serve", "pacs")
TEST_TOOLS = ("pytest", "httpx")  # from the dev extra: what the floor tests need to run


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    specs = list(project["dependencies"]) + [s for e in EXTRAS for s in extras[e]]
    specs += [s for s in extras["dev"] if re.split(r"[<>=!~\[ ]", s, maxsplit=1)[0] in TEST_TOOLS]
    out = []
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", spec.strip())
        if m is None:
            sys.exit(f"pyproject.toml: {spec!r} has no plain '>=' floor to pin")
        out.append(f"{m.group(1)}=={m.group(2)}")
    return sorted(set(out))


if __name__ == "__main__":
    print("\n".join(floors(Path(__file__).resolve().parents[1] / "pyproject.toml")))
