"""The README as a front page and docs/ as a site: commands CI runs, links that resolve, every page in the nav."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

from tests.helpers.processes import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def heading_text(line: str) -> str:
    text = re.sub(r"^#+\s*", "", line).strip()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    return text.replace("`", "").replace("**", "")


def github_slug(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, every space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's toc slugify, which MkDocs uses for the site's anchors."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def anchors(path: Path, slug) -> set[str]:
    return {slug(heading_text(line)) for line in prose_lines(path) if line.startswith("#")}


def relative_links(path: Path) -> list[str]:
    return [target for line in prose_lines(path) for target in LINK.findall(line)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def check_links(path: Path) -> list[str]:
    """Each relative link of ``path``: the file exists, and its anchor exists on GitHub and on the site."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{path.name}: {target}: no such file")
        elif anchor and linked.suffix == ".md":
            for name, slug in (("GitHub", github_slug), ("MkDocs", mkdocs_slug)):
                if anchor not in anchors(linked, slug):
                    broken.append(f"{path.name}: {target}: no such heading on {name}")
    return broken


def test_the_readmes_two_commands_are_what_ci_runs() -> None:
    readme = README.read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start (two commands)", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in quick_start.strip().splitlines()]
    assert commands == ["./demo.sh", ".venv/bin/python -m pytest"]
    ci = [line.split("#", 1)[0].strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci
    assert any(line.startswith(".venv/bin/mkdocs build --strict") for line in ci)


def test_the_readme_is_a_front_page_with_one_command_per_stage() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, "README.md is the front page: move the detail into docs/"
    readme = "\n".join(lines)
    for script in ("utils/download_lila_subset.py", "utils/clean_cct.py", "utils/crop_detections.py",
                   "utils/create_classification_dataset.py", "classifier/train.py", "classifier/predict.py",
                   "classifier/active_learning.py", "classifier/export.py"):
        assert f"python {script} " in readme, script


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda page: page.name)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert check_links(page) == []


def test_the_link_check_finds_a_broken_file_and_a_broken_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Held out in time (`--split-by time`)\n\ntext\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#held-out-in-time---split-by-time) [gone](c.md) [no](a.md#nowhere)\n")
    assert check_links(page) == [
        "b.md: a.md#held-out-in-time---split-by-time: no such heading on MkDocs",  # GitHub's slug only
        "b.md: c.md: no such file",
        "b.md: a.md#nowhere: no such heading on GitHub",
        "b.md: a.md#nowhere: no such heading on MkDocs",
    ]


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for item in nav for page in nav_pages(item)]


def test_every_docs_page_is_in_the_nav_once() -> None:
    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and config["strict"] is True
    pages = nav_pages(config["nav"])
    assert sorted(pages) == sorted(path.name for path in DOCS.glob("*.md"))
    assert len(pages) == len(set(pages))


def test_every_entry_point_is_documented() -> None:
    docs = "\n".join(path.read_text(encoding="utf-8") for path in DOCS.glob("*.md"))
    scripts = [path for folder in ("utils", "classifier") for path in sorted((REPO_ROOT / folder).glob("*.py"))
               if path.name != "__init__.py"]
    assert scripts
    assert [f"{path.parent.name}/{path.name}" for path in scripts if path.name not in docs] == []


def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra: pip install -e '.[dev]'")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    assert (tmp_path / "site" / "index.html").exists()
