"""Library errors name the library's parameters; only the front ends (commands/, serve/, the
CLI) speak in command-line flags, which `commands._common.flag_message` puts in."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "chestxray"
FRONT_ENDS = ("commands", "serve", "pacs", "cli.py")  # pacs: the DICOM front end beside serve
FLAG = re.compile(r"--[a-z]")


def _error_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """The string pieces of every call to a class named *Error (raised or built for later)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name.endswith("Error"):
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    out += [
                        (c.lineno, c.value)
                        for c in ast.walk(arg)
                        if isinstance(c, ast.Constant) and isinstance(c.value, str)
                    ]
    return out


def test_no_error_below_the_front_ends_names_a_command_line_flag():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in FRONT_ENDS:
            continue
        for line, text in _error_strings(ast.parse(path.read_text(), str(path))):
            if FLAG.search(text):
                found.append(f"{rel}:{line}: {text.strip()[:90]}")
    assert not found, "\n".join(found)


def test_the_command_line_shows_flags_for_the_library_parameters():
    from chestxray.commands._common import flag_message
    from chestxray.errors import ChestXrayError

    exc = ChestXrayError("device='cuda:3': no CUDA device here; use device='cpu', or pass resume=True and out=FILE")
    assert (
        flag_message(exc) == "--device cuda:3: no CUDA device here; use --device cpu, or pass --resume and --out FILE"
    )
    assert flag_message(ChestXrayError("fmt='parquet' needs out=FILE")) == "--format parquet needs --out FILE"
    assert flag_message(ChestXrayError("a.png: not a PNG")) == "a.png: not a PNG"  # nothing to translate
