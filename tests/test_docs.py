"""The documentation: the site builds strictly, and every runnable example on it prints what it shows."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_checker():
    spec = importlib.util.spec_from_file_location("docs_check", REPO / "tools" / "docs_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_check"] = module
    spec.loader.exec_module(module)
    return module


docs_check = _load_checker()


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    return page


@pytest.mark.slow
def test_every_marked_example_prints_what_its_page_shows():
    report = docs_check.check(docs_check.default_pages())
    print(report.summary())
    assert not report.problems, "\n".join(f"{p.where}: {p.message}" for p in report.problems)
    assert len(report.ran) >= 10  # the README's and the site's runnable examples
    assert any(w.startswith("README.md") for w in report.ran)  # make run's output on the landing page


def test_a_changed_printed_format_fails_naming_page_and_line(tmp_path):
    # the real `chestxray datasets` output, with one mapping shown in another format
    page = _page(
        tmp_path,
        "# p\n\n<!-- check -->\n```console\n$ chestxray datasets chexpert | head -3\n"
        "chexpert:PATH  CheXpert v1.0 / v1.0-small\n"
        "  layout: CheXpert-v1.0-small/train.csv, valid.csv (Path relative to ROOT), JPEGs\n"
        "  No Finding                                   => -\n```\n",
    )
    report = docs_check.check([page])
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert problem.where.endswith("page.md:5")
    assert "line 8: shown   '  No Finding" in problem.message
    assert "-> -" in problem.message  # what it printed instead


def test_wildcards_exit_status_setup_and_update(tmp_path):
    text = (
        "<!-- check\nsetup: printf 'x\\n' > f.txt\n-->\n```console\n"
        "$ cat f.txt; echo 'took 3.2 s'; printf 'a\\nb\\nc\\n'\n"
        "y\ntook ... s\na\n...\n```\n\n"
        "<!-- check rc=3 -->\n```console\n$ echo out; exit 3\nout\n```\n"
    )
    page = _page(tmp_path, text)
    report = docs_check.check([page])
    assert [p.where for p in report.problems] == [f"{page}:5"]  # only the cat line differs
    assert "line 6: shown   'y'\n" in report.problems[0].message
    assert "printed 'x'" in report.problems[0].message

    report = docs_check.check([page], update=True)
    assert not report.problems
    updated = page.read_text()
    assert "x\ntook ... s\na\n...\n" in updated  # the real line in, the page's `...` kept
    assert not docs_check.check([page]).problems


def test_absolute_paths_are_shown_as_wildcards_not_hidden(tmp_path):
    page = _page(tmp_path, "<!-- check -->\n```console\n$ mkdir -p out && cd out && pwd\nout\n```\n")
    assert len(docs_check.check([page]).problems) == 1  # it prints an absolute path, not "out"
    docs_check.check([page], update=True)
    assert "$ mkdir -p out && cd out && pwd\n.../out\n" in page.read_text()
    assert not docs_check.check([page]).problems


def test_unmarked_transcript_is_an_error_and_needs_are_listed(tmp_path):
    page = _page(
        tmp_path,
        "```console\n$ chestxray info /data/nih\nrows 112,120\n```\n\n"
        "<!-- check needs=gpu -->\n```console\n$ make gpu-check\nok\n```\n\n"
        "```bash\nchestxray serve   # no output shown: not an example\n```\n",
    )
    report = docs_check.check([page])
    assert [p.where for p in report.problems] == [f"{page}:1"]
    assert "no `<!-- check -->` marker" in report.problems[0].message
    assert report.skipped == {"gpu": [f"{page}:7"]}
    assert "1 need a CUDA GPU" in report.summary()


def test_python_snippets_run_and_name_the_failing_line(tmp_path):
    page = _page(
        tmp_path,
        "<!-- check -->\n```python\nx = 20\n```\n\n"
        "<!-- check -->\n```pycon\n>>> x + 1\n21\n>>> x * 2\n41\n```\n\n"
        "<!-- check -->\n```python\nraise ValueError('boom')\n```\n",
    )
    report = docs_check.check([page])
    wheres = [p.where for p in report.problems]
    assert wheres == [f"{page}:10", f"{page}:15"]
    assert "got:   '40'" in report.problems[0].message
    assert "ValueError: boom" in report.problems[1].message


def test_unknown_needs_is_refused(tmp_path):
    page = _page(tmp_path, "<!-- check needs=quantum -->\n```console\n$ true\n```\n")
    report = docs_check.check([page])
    assert len(report.problems) == 1 and "needs='quantum'" in report.problems[0].message


def test_api_reference_covers_every_public_name():
    import chestxray

    documented = set(re.findall(r"^::: [\w.]*?\.(\w+)$", (REPO / "docs" / "api.md").read_text(), flags=re.M))
    assert documented == set(chestxray.__all__)


def test_readme_is_a_landing_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert "Not a medical device" in readme
    for page in re.findall(r"\]\(docs/([\w-]+\.md)", readme):
        assert (REPO / "docs" / page).is_file(), page


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed (pip install '.[docs]')")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("chestxray.inference.predict.Analyzer") > 0
    home = (tmp_path / "site" / "index.html").read_text()
    assert 'src="example-cam-effusion.png"' in home  # the README's docs/ links rewritten for the site
