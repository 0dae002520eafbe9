"""Run the examples in README.md and docs/*.md and compare their output with the page.

A fenced block is an example when the line before it is a `check` marker:

    <!-- check -->
    ```console
    $ chestxray predict examples/00013125_000.png --backend onnx
    model chestxray-resnet50-nihsample-128 (onnx int8): 1 of 1 images analysed ...
    ```

Shell blocks (console, text, bash, shell) hold `$ command` lines, each followed by the output it
prints (stdout and stderr together). Every command of a page runs in one temporary folder that
holds links to the repository's `examples/` and `tests/` (its fixtures), with the repository's
`src/` first on PYTHONPATH and the running Python's `bin/` first on PATH, so `chestxray` is the
checkout's. `pycon` blocks run through doctest (ELLIPSIS, NORMALIZE_WHITESPACE) and `python`
blocks must run without an exception; Python snippets of one page share their names.

Volatile parts are declared in the page itself, as doctest does: `...` inside a line matches any
text, and a line that is only `...` matches any number of lines (0 or more). Paths of the temporary
folder and of the repository are shown relative.

Marker options (`<!-- check key=value ... -->`, or one `key: value` per line before `-->`):
  needs=nih|sample|gpu|network|offline|server|dataset|slow   skip it here, listed in the summary
  rc=N       the exit status of the block's last command (default 0; every other must exit 0)
  setup: CMD a shell command run first, output not shown (repeatable)

A shell block that shows `$ command` lines and output but has no marker is an error: mark it
`<!-- check -->` or say what it needs.

Examples that need real data refer to it as `../shared/...` (the folder beside a clone, as
`.ci/run` expects); `--with sample,dataset` runs them too, with `../shared` linked to `--shared`.

    python tools/docs_check.py            # check README.md and docs/*.md; exit 1 on drift
    python tools/docs_check.py --update   # rewrite the shown output from the real one
    python tools/docs_check.py docs/prediction.md -k csv   # one page, blocks containing "csv"
    python tools/docs_check.py --with sample,dataset --shared /work/shared   # also the real-data ones
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"console", "text", "bash", "shell", "sh", ""}
PY_LANGS = {"pycon", "python"}
NEEDS = {
    "nih": "the full NIH ChestX-ray14 images",
    "sample": "the 1,350-image NIH sample (CHESTXRAY_SAMPLE_ROOT)",
    "dataset": "another full dataset (CheXpert, MIMIC-CXR, PadChest, VinDr-CXR)",
    "gpu": "a CUDA GPU",
    "network": "the network",
    "offline": "a machine without network (shows the offline error)",
    "server": "a running `chestxray serve`",
    "slow": "minutes of CPU time",
}
_settings = {"timeout_s": 180.0}  # per command; --timeout
LINKED = ("examples", "tests")  # what a page's temporary folder links to

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*check\b(?P<rest>.*)$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: list[str]  # lines between the fences, without the newline
    options: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    marked: bool = False

    @property
    def where(self) -> str:
        return f"{_rel(self.page)}:{self.line}"

    def shows_transcript(self) -> bool:
        return self.lang in SHELL_LANGS and any(ln.startswith("$ ") for ln in self.body)


@dataclass
class Problem:
    where: str
    message: str


@dataclass
class Report:
    ran: list[str] = field(default_factory=list)
    commands: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"docs check: {len(self.ran)} examples ran ({self.commands} shell commands), {len(self.problems)} problems"
        ]
        n_skipped = sum(len(v) for v in self.skipped.values())
        if n_skipped:
            lines.append(f"skipped {n_skipped}:")
            for need, wheres in sorted(self.skipped.items()):
                lines.append(f"  {len(wheres)} need {NEEDS[need]}: {', '.join(wheres)}")
        if self.updated:
            lines.append(f"updated {len(self.updated)}: {', '.join(self.updated)}")
        return "\n".join(lines)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def default_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]


def _parse_options(text: str, where: str) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    setup: list[str] = []
    text = text.replace("-->", "")
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("setup:"):
            setup.append(line[len("setup:") :].strip())
            continue
        for token in shlex.split(line):
            key, sep, value = token.partition("=")
            if not sep and ":" in token:
                key, _, value = token.partition(":")
            if key not in ("needs", "rc"):
                raise ValueError(f"{where}: unknown check option {token!r} (needs=, rc=, setup:)")
            if key == "needs" and value not in NEEDS:
                raise ValueError(f"{where}: needs={value!r} is not one of {', '.join(NEEDS)}")
            options[key] = value
    return options, setup


def parse_page(page: Path) -> list[Block]:
    """The fenced blocks of a page with the check marker (if any) that precedes each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: tuple[dict[str, str], list[str]] | None = None
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            start = i
            text = m.group("rest")
            while "-->" not in lines[i]:
                i += 1
                if i == len(lines):
                    raise ValueError(f"{_rel(page)}:{start + 1}: check marker without -->")
                text += "\n" + lines[i]
            pending = _parse_options(text, f"{_rel(page)}:{start + 1}")
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f:
            fence, lang, indent = f.group("fence"), f.group("lang").lower(), len(f.group("indent"))
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            body = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[i + 1 : j]]
            block = Block(page, i + 1, lang, body)
            if pending is not None:
                block.options, block.setup = pending
                block.marked = True
            blocks.append(block)
            pending = None
            i = j + 1
            continue
        if lines[i].strip():
            pending = None  # a marker applies to the block right after it (blank lines allowed)
        i += 1
    return blocks


# --- matching -----------------------------------------------------------------------------------


def _line_matches(pattern: str, line: str) -> bool:
    if "..." not in pattern:
        return pattern == line
    regex = ".*".join(re.escape(part) for part in pattern.split("..."))
    return re.fullmatch(regex, line, flags=re.DOTALL) is not None


def align(expected: list[str], actual: list[str]) -> tuple[int, list[tuple[str, int | None, int | None]]]:
    """Least-edit alignment of expected patterns with actual lines.

    Returns (edits, ops) with ops ("match", i, j), ("wild", i, None) for a `...` line,
    ("missing", i, None) for an expected line not printed and ("extra", None, j) for a printed
    line not shown. The output matches the page when edits == 0.
    """
    n, m = len(expected), len(actual)
    inf = n + m + 1
    # cost[i][j]: edits to align expected[i:] with actual[j:]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    cost[n][m] = 0
    for j in range(m - 1, -1, -1):
        cost[n][j] = cost[n][j + 1] + 1
    for i in range(n - 1, -1, -1):
        wild = expected[i].strip() == "..."
        for j in range(m, -1, -1):
            best = cost[i + 1][j] + (0 if wild else 1)
            if j < m:
                if wild:
                    best = min(best, cost[i][j + 1])
                else:
                    if _line_matches(expected[i], actual[j]):
                        best = min(best, cost[i + 1][j + 1])
                    best = min(best, cost[i][j + 1] + 1)
            cost[i][j] = best
    ops: list[tuple[str, int | None, int | None]] = []
    i = j = 0
    while i < n or j < m:
        wild = i < n and expected[i].strip() == "..."
        if i < n and wild and j < m and cost[i][j] == cost[i][j + 1]:
            j += 1  # the wildcard absorbs actual[j]
            continue
        if i < n and wild and cost[i][j] == cost[i + 1][j]:
            ops.append(("wild", i, None))
            i += 1
            continue
        if i < n and j < m and _line_matches(expected[i], actual[j]) and cost[i][j] == cost[i + 1][j + 1]:
            ops.append(("match", i, j))
            i, j = i + 1, j + 1
            continue
        if j < m and (i == n or cost[i][j] == cost[i][j + 1] + 1):
            ops.append(("extra", None, j))
            j += 1
            continue
        ops.append(("missing", i, None))
        i += 1
    return cost[0][0], ops


def merged_output(expected: list[str], actual: list[str], shown_as: list[str] | None = None) -> list[str]:
    """The page's output updated to the actual one, keeping its `...` where they still match;
    new lines are taken from `shown_as` (the actual lines as a page shows them) when given."""
    _, ops = align(expected, actual)
    shown_as = actual if shown_as is None else shown_as
    out: list[str] = []
    for kind, i, j in ops:
        if kind in ("match", "wild") and i is not None:
            out.append(expected[i])
        elif kind == "extra" and j is not None:
            out.append(shown_as[j])
    return out


def describe_drift(block: Block, first_line: int, expected: list[str], actual: list[str]) -> str:
    """Where the output differs, by page line: the first few differences, a line the page
    shows paired with the line printed in its place."""
    _, ops = align(expected, actual)
    notes: list[str] = []
    k = 0
    while k < len(ops):
        if ops[k][0] in ("match", "wild"):
            k += 1
            continue
        hunk_end = k
        while hunk_end < len(ops) and ops[hunk_end][0] not in ("match", "wild"):
            hunk_end += 1
        missing = [i for kind, i, _ in ops[k:hunk_end] if kind == "missing" and i is not None]
        extra = [j for kind, _, j in ops[k:hunk_end] if kind == "extra" and j is not None]
        # the page line where this hunk starts (or would be inserted)
        at = next((i for _, i, _ in ops[k:] if i is not None), len(expected))
        for n in range(max(len(missing), len(extra))):
            if n < len(missing) and n < len(extra):
                notes.append(f"  line {first_line + missing[n]}: shown   {expected[missing[n]]!r}")
                notes.append(f"  {' ' * len(str(first_line + missing[n]))}       printed {actual[extra[n]]!r}")
            elif n < len(missing):
                notes.append(f"  line {first_line + missing[n]}: shown but not printed: {expected[missing[n]]!r}")
            else:
                notes.append(f"  line {first_line + at}: printed but not shown: {actual[extra[n]]!r}")
        k = hunk_end
    shown = notes[:12]
    if len(notes) > 12:
        shown.append(f"  ... and {len(notes) - 12} more lines")
    return "\n".join(shown)


# --- running ------------------------------------------------------------------------------------


def _environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["CHESTXRAY_CACHE"] = str(workdir / ".cache")
    env["PYTHONUNBUFFERED"] = "1"  # stdout and stderr interleave as on a terminal
    env["MPLBACKEND"] = "Agg"
    env["COLUMNS"] = "100"
    env.pop("PYTHONSTARTUP", None)
    return env


def _lines(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _as_shown(lines: list[str], workdir: Path) -> list[str]:
    """Printed lines as a page shows them: the absolute paths of this run (the temporary folder,
    the repository, the shared data) become `...`, the page's wildcard. They are compared as
    printed, so a page never hides that a command prints an absolute path."""
    bases = {str(workdir.resolve()), str(workdir), str(REPO)}
    link = workdir.parent / "shared"
    if link.is_symlink():
        bases |= {str(link.resolve()), str(link)}
    out = []
    for line in lines:
        for base in sorted(bases, key=len, reverse=True):
            line = line.replace(base, "...")
        out.append(line)
    return out


def _split_transcript(body: list[str], start: int) -> list[tuple[str, int, list[str]]]:
    """(command, page line of its first output line, shown output) per `$ ` command."""
    out: list[tuple[str, int, list[str]]] = []
    k = 0
    while k < len(body):
        if not body[k].startswith("$ "):
            k += 1
            continue
        command = body[k][2:]
        while command.rstrip().endswith("\\") and k + 1 < len(body):
            k += 1
            command = command.rstrip()[:-1] + " " + body[k].strip()
        k += 1
        first = k
        while k < len(body) and not body[k].startswith("$ "):
            k += 1
        shown = [ln.rstrip() for ln in body[first:k]]
        while shown and not shown[-1]:
            shown.pop()
        out.append((command, start + first, shown))
    return out


def _run_shell(block: Block, workdir: Path, report: Report, update: bool) -> list[str] | None:
    """Run a shell block; return its new body when updating and the output drifted."""
    env = _environment(workdir)
    for cmd in block.setup:
        r = subprocess.run(
            cmd, shell=True, cwd=workdir, env=env, capture_output=True, text=True, timeout=_settings["timeout_s"]
        )
        if r.returncode:
            report.problems.append(
                Problem(block.where, f"setup {cmd!r} exited {r.returncode}: {r.stderr.strip()[-500:]}")
            )
            return None
    steps = _split_transcript(block.body, block.line + 1)
    new_body = list(block.body)
    changed = False
    for n, (command, first_line, shown) in enumerate(steps):
        report.commands += 1
        try:
            r = subprocess.run(
                ["bash", "-o", "pipefail", "-c", command],
                cwd=workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=_settings["timeout_s"],
            )
        except subprocess.TimeoutExpired:
            report.problems.append(
                Problem(
                    f"{_rel(block.page)}:{first_line - 1}", f"$ {command}: no answer in {_settings['timeout_s']:.0f} s"
                )
            )
            return None
        actual = _lines(r.stdout)
        want_rc = int(block.options.get("rc", "0")) if n == len(steps) - 1 else 0
        where = f"{_rel(block.page)}:{first_line - 1}"
        if r.returncode != want_rc:
            tail = "\n".join("  | " + ln for ln in actual[-15:])
            report.problems.append(
                Problem(where, f"$ {command}: exit status {r.returncode}, the page expects {want_rc}\n{tail}")
            )
            continue
        edits, _ = align(shown, actual)
        if edits:
            if update:
                merged = merged_output(shown, actual, _as_shown(actual, workdir))
                offset = first_line - block.line - 1 + (len(new_body) - len(block.body))
                new_body[offset : offset + len(shown)] = merged
                changed = True
            else:
                report.problems.append(
                    Problem(
                        where,
                        f"$ {command}: output differs from the page\n{describe_drift(block, first_line, shown, actual)}",
                    )
                )
    return new_body if changed else None


class _Recorder(doctest.DocTestRunner):
    def __init__(self) -> None:
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        super().__init__(optionflags=flags, verbose=False)
        self.failed_examples: list[tuple[doctest.Example, str]] = []

    def report_failure(self, out, test, example, got):
        self.failed_examples.append((example, got))

    def report_unexpected_exception(self, out, test, example, exc_info):
        import traceback

        got = "".join(traceback.format_exception_only(exc_info[0], exc_info[1]))
        self.failed_examples.append((example, "Traceback (most recent call last):\n  ...\n" + got))


@contextlib.contextmanager
def _inside(workdir: Path) -> Iterator[None]:
    old_cwd, old_path = os.getcwd(), list(sys.path)
    os.chdir(workdir)
    sys.path.insert(0, str(REPO / "src"))
    saved = {k: os.environ.get(k) for k in ("CHESTXRAY_CACHE", "MPLBACKEND")}
    os.environ["CHESTXRAY_CACHE"] = str(workdir / ".cache")
    os.environ["MPLBACKEND"] = "Agg"
    try:
        yield
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_python(block: Block, workdir: Path, globs: dict, report: Report, update: bool) -> list[str] | None:
    text = "\n".join(block.body) + "\n"
    with _inside(workdir):
        if block.lang == "python":
            try:
                exec(compile(text, block.where, "exec"), globs)
            except Exception as e:
                report.problems.append(Problem(block.where, f"python snippet raised {type(e).__name__}: {e}"))
            return None
        test = doctest.DocTestParser().get_doctest(text, globs, block.where, str(block.page), block.line)
        runner = _Recorder()
        runner.run(test, clear_globs=False)
    if not runner.failed_examples:
        return None
    if not update:
        for example, got in runner.failed_examples:
            line = block.line + 1 + example.lineno
            report.problems.append(
                Problem(
                    f"{_rel(block.page)}:{line}",
                    f">>> {example.source.strip()}\n  shown: {example.want.rstrip()!r}\n  got:   {got.rstrip()!r}",
                )
            )
        return None
    body = list(block.body)
    for example, got in sorted(runner.failed_examples, key=lambda eg: -eg[0].lineno):
        src_lines = example.source.count("\n")
        at = example.lineno + src_lines
        want_lines = example.want.count("\n")
        indent = " " * example.indent
        body[at : at + want_lines] = [indent + ln for ln in got.rstrip("\n").splitlines()]
    return body


def _warm_up() -> None:
    """Build matplotlib's font cache once, so no command prints "generated new fontManager"."""
    with contextlib.suppress(Exception):
        subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], capture_output=True, timeout=120)


def check(
    pages: list[Path],
    update: bool = False,
    select: str | None = None,
    enabled: frozenset[str] = frozenset(),
    shared: Path | None = None,
) -> Report:
    """Check (or with `update`, rewrite) the marked examples of `pages`. Examples whose needs are
    in `enabled` run too; `shared` is what `../shared` means to them."""
    report = Report()
    _warm_up()
    for page in pages:
        try:
            blocks = parse_page(page)
        except ValueError as e:
            report.problems.append(Problem(_rel(page), str(e)))
            continue
        todo: list[Block] = []
        for block in blocks:
            if not block.marked:
                if block.shows_transcript():
                    report.problems.append(
                        Problem(block.where, "shell example with output but no `<!-- check -->` marker (or needs=...)")
                    )
                continue
            if select and not any(select in ln for ln in block.body):
                continue
            if "needs" in block.options and block.options["needs"] not in enabled:
                report.skipped.setdefault(block.options["needs"], []).append(block.where)
                continue
            todo.append(block)
        if not todo:
            continue
        replacements: dict[int, list[str]] = {}
        with tempfile.TemporaryDirectory(prefix="chestxray-docs-") as tmp:
            workdir = Path(tmp) / "work"
            workdir.mkdir()
            if shared is not None:
                (Path(tmp) / "shared").symlink_to(shared.resolve())
            for name in LINKED:
                (workdir / name).symlink_to(REPO / name)
            globs: dict = {"__name__": "__docs__"}
            for block in todo:
                if block.lang in PY_LANGS:
                    new = _run_python(block, workdir, globs, report, update)
                elif block.lang in SHELL_LANGS:
                    new = _run_shell(block, workdir, report, update)
                else:
                    report.problems.append(Problem(block.where, f"cannot check a {block.lang!r} block"))
                    continue
                report.ran.append(block.where)
                if new is not None:
                    replacements[block.line] = new
                    report.updated.append(block.where)
        if replacements:
            _rewrite(page, replacements)
    return report


def _rewrite(page: Path, replacements: dict[int, list[str]]) -> None:
    lines = page.read_text(encoding="utf-8").splitlines()
    for fence_line in sorted(replacements, reverse=True):
        start = fence_line  # index of the first body line
        end = start
        fence = FENCE.match(lines[fence_line - 1])
        assert fence is not None
        while not lines[end].strip().startswith(fence.group("fence")):
            end += 1
        indent = fence.group("indent")
        lines[start:end] = [indent + ln if ln else ln for ln in replacements[fence_line]]
    page.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pages", nargs="*", type=Path, help="Markdown files (default: README.md and docs/**/*.md)")
    ap.add_argument("--update", action="store_true", help="rewrite each drifted output on the page from the real one")
    ap.add_argument("-k", dest="select", help="only the blocks whose text contains this string")
    ap.add_argument("--with", dest="enabled", default="", help=f"also run examples that need these: {','.join(NEEDS)}")
    ap.add_argument(
        "--shared",
        type=Path,
        default=REPO.parent / "shared",
        help="what ../shared means (default: beside the repository)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=_settings["timeout_s"],
        help="seconds one command may take (default %(default)s)",
    )
    args = ap.parse_args(argv)
    _settings["timeout_s"] = args.timeout
    enabled = frozenset(filter(None, args.enabled.split(",")))
    if unknown := enabled - NEEDS.keys():
        ap.error(f"--with: unknown {', '.join(sorted(unknown))}")
    start = time.monotonic()
    shared = args.shared if args.shared.is_dir() else None
    report = check(
        args.pages or default_pages(), update=args.update, select=args.select, enabled=enabled, shared=shared
    )
    for p in report.problems:
        print(f"{p.where}: {p.message}")
    print(report.summary() + f" ({time.monotonic() - start:.0f} s)")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
