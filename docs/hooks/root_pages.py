"""MkDocs hook: serve the root README.md, MODEL_CARD.md and BENCHMARKS.md as site pages.

They stay where GitHub and the tests expect them (one copy, no plugin); their links are
rewritten from repository paths to site paths.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
PAGES = {"README.md": "index.md", "MODEL_CARD.md": "model-card.md", "BENCHMARKS.md": "benchmarks.md"}
LINK = re.compile(r"(\]\(|src=\")(?P<target>[^)\"#\s]*)(?P<anchor>#[^)\"\s]*)?")


def _site_link(match: re.Match[str]) -> str:
    target, anchor = match.group("target"), match.group("anchor") or ""
    if target in PAGES:
        target = PAGES[target]
    elif target.startswith("docs/"):
        target = target[len("docs/") :]
    return f"{match.group(1)}{target}{anchor}"


def on_files(files: Files, config) -> Files:
    for source, page in PAGES.items():
        text = LINK.sub(_site_link, (ROOT / source).read_text(encoding="utf-8"))
        files.append(File.generated(config, page, content=text))
    return files
