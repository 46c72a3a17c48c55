"""The README and the MkDocs site cannot rot: relative links and their anchors resolve, every page is
in the nav, and the README's set-up commands are the ones CI and the scripts run. Plain text parsing
only (no MkDocs needed); the strict MkDocs build runs too where the `docs` extra is installed."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("**/*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where a `](` is not a link."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (MkDocs' default) of a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    seen: set[str] = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug, n = _slug(m.group(1)), 0
        while (slug if n == 0 else f"{slug}_{n}") in seen:  # toc's suffix for a repeated heading
            n += 1
        seen.add(slug if n == 0 else f"{slug}_{n}")
    return seen


def _relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, flags=re.I)]  # http:, https:, mailto:


def _nav_pages() -> list[str]:
    """The .md files named in mkdocs.yml's nav (``- Title: page.md`` or ``- page.md``)."""
    text = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]  # up to the next top-level key
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", nav, flags=re.M)


def _indented_command_after(text: str, marker: str) -> str:
    after = text.split(marker, 1)[1]
    return next(line.strip() for line in after.splitlines() if line.startswith("    "))


def test_there_are_docs_pages() -> None:
    assert (DOCS / "index.md") in PAGES and len(PAGES) >= 5


@pytest.mark.parametrize("page", [REPO / "README.md", *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif page.parent != REPO and not dest.is_relative_to(DOCS):
            broken.append(f"{target}: outside docs/ (MkDocs cannot serve it; write it as a code path)")
        elif anchor and dest.suffix == ".md" and dest.is_relative_to(DOCS) and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    nav = _nav_pages()
    pages = [str(p.relative_to(DOCS)) for p in PAGES]
    assert sorted(nav) == sorted(set(nav)), "a page is in the nav twice"
    assert set(pages) - set(nav) == set(), "pages missing from mkdocs.yml's nav"
    assert set(nav) - set(pages) == set(), "nav entries without a page"
    assert nav[0] == "index.md"


def test_readme_set_up_commands_are_what_ci_and_the_scripts_run() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    demo = _indented_command_after(readme, "Run the demo experiment")
    test = _indented_command_after(readme, "Run the tests:")
    assert (demo, test) == ("bash scripts/demo.sh", "bash scripts/test.sh")
    assert ci == [test]
    assert (REPO / "scripts" / "demo.sh").is_file() and (REPO / "scripts" / "test.sh").is_file()
    assert "ctprune run examples/demo.toml" in (REPO / "scripts" / "demo.sh").read_text()
    # the docs' set-up page gives the same two commands
    started = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    assert (_indented_command_after(started, "Run the demo experiment"),
            _indented_command_after(started, "Run the tests:")) == (demo, test)


def test_readme_is_a_front_page() -> None:
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_the_docs_extra_installs_mkdocs() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("mkdocs") for req in extras["docs"])


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(REPO / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
