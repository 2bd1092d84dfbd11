"""README.md and docs/*.md: every relative link and #anchor resolves, the README stays a short front door
(at most 300 lines, a contents list linking every section), and nothing cites a document the repository
does not hold (an issue number, the former DESIGN file). Text only: no stage runs."""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code spans blanked (a `[x](y)` in code is no link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else re.sub(r"`[^`]*`", "``", line))
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"[*_]{1,2}([^*_]+)[*_]{1,2}", r"\1", text)
    text = unicodedata.normalize("NFC", text.strip().lower())
    text = "".join(c for c in text if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("M"))
    return text.replace(" ", "-")


def _headings(text: str) -> list[tuple[int, str]]:
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)):
            out.append((len(m[1]), m[2]))
    return out


def _anchors(path: Path) -> set[str]:
    """Every anchor a page defines: its headings' slugs (repeats get -1, -2, ...) and explicit ids."""
    text = path.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    anchors = set()
    for _, heading in _headings(text):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        anchors.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    anchors |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return anchors


def _links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image; link text may wrap onto the next line."""
    prose = "\n".join(_prose(path.read_text(encoding="utf-8")))
    return [(prose.count("\n", 0, m.start(1)) + 1, m[1]) for m in LINK.finditer(prose)]


def test_the_pages_exist() -> None:
    names = {p.name for p in PAGES}
    assert {"README.md", "method.md", "engines.md", "results.md", "published.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for number, target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...: not this repository's
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{where} (outside the repository)")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in _anchors(dest):
            broken.append(f"{where} (no such anchor in {dest.relative_to(ROOT)})")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{where} (an anchor into a file that is not Markdown)")
    assert not broken, "\n".join(broken)


def test_the_link_checker_sees_broken_links(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing anchor and a link inside code are told apart."""
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n## Two: `code`, words!\n\n[ok](#two-code-words) [bad](#nowhere)\n"
                    "[file](missing.md) `[not a link](missing.md)` [wrapped\ntext](#a-title)\n\n"
                    "```\n[in code](gone.md)\n```\n")
    assert _anchors(page) == {"a-title", "two-code-words"}
    assert _links(page) == [(5, "#two-code-words"), (5, "#nowhere"), (6, "missing.md"), (7, "#a-title")]


def test_readme_is_a_front_door_with_a_contents_list() -> None:
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    sections = [h for level, h in _headings(text) if level == 2]
    assert sections and sections[0] == "Contents", sections
    body = text.split("\n## Contents", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\s*[-*]\s+\[[^\]]+\]\(#([^)]+)\)", body, re.M)
    assert listed == [_slug(h) for h in sections[1:]], (listed, sections)


def test_readme_keeps_the_two_commands_ci_runs() -> None:
    """The commands the README opens with are the ones CI (.ci/run) and a user run, and what they print."""
    text = README.read_text(encoding="utf-8")
    head = text.split("\n## ", 2)
    assert "bash run.sh" in text and "bash test.sh" in text
    assert "bash test.sh" in (ROOT / ".ci" / "run").read_text()
    assert any("```bash\nbash run.sh" in part and "\nbash test.sh" in part for part in head[:3])
    # what run.sh prints is what the README shows it printing
    run_sh = (ROOT / "run.sh").read_text()
    for printed in ("Pipeline finished in", "This run's report (results/report.csv):", "Report:", "Logs:",
                    "Reference:"):
        assert printed in run_sh and printed in text, printed


def test_readme_draws_the_dag_with_both_branches() -> None:
    text = README.read_text(encoding="utf-8")
    rules = set(re.findall(r"^rule (\w+):", (ROOT / "Snakefile").read_text(), re.M)) - {"all"}
    missing = {r for r in rules if not re.search(rf"(?<![\w`]){r}(?![\w`])", text)}
    assert not missing, f"the README's DAG leaves out {sorted(missing)}"


def _tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True, text=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git and a git checkout")
    files = []
    for name in filter(None, names):
        path = ROOT / name
        if path.suffix in {".png", ".jpg", ".jpeg", ".gz", ".zip", ".pt", ".npz"} or not path.is_file():
            continue
        files.append(path)
    return files


def test_nothing_cites_an_issue_number_or_the_former_design_file() -> None:
    """A reader of the repository cannot open the project's issue tracker or a DESIGN file it no longer holds.
    Public threads of other repositories, named with their owner/name, are sources a reader can open;
    docs/published.md, which lists such sources, is exempt."""
    citation = re.compile(r"\bDESIGN\b|\bissues? #?\d+\b|\(issue\b|(?<![\w/])#\d+\b(?![0-9a-fA-F])", re.I)
    exempt = {ROOT / "docs" / "published.md", Path(__file__).resolve()}
    found = []
    for path in _tracked_text_files():
        if path in exempt or ROOT / "results" in path.parents:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for m in citation.finditer(line):
                if m[0].startswith("#") and re.search(r"color|background|border|fill|&#", line, re.I):
                    continue  # a CSS colour or an HTML entity, not an issue
                if re.search(r"[\w.-]+/[\w.-]+\s*(?:#|issues?\s)\d", line):
                    continue  # another repository's public thread (owner/name#N), which a reader can open
                found.append(f"{path.relative_to(ROOT)}:{number}: {m[0]!r} in {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_cited_sections_exist() -> None:
    """`README, "Section"` or `docs/x.md, "Section"` in code, configs, docs or results must name a section (or a
    labelled list item) that page still has: the README's detail moved to docs/, and a citation of a moved
    section points at nothing."""
    cited = re.compile(r"\bREADME(?:'s)?[,:]?\s+\"([^\"]+)\"|\(README,\s+([A-Z][\w ]*)\)"
                       r"|\b((?:docs|results)/[\w./-]+\.md)[,:]?\s+\"([^\"]+)\"")
    headings: dict[Path, list[str]] = {}
    stale = []
    for path in _tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for m in cited.finditer(text):
            page = ROOT / m[3] if m[3] else README
            name = re.sub(r"\s+", " ", m[1] or m[2] or m[4]).strip()
            if page not in headings:  # a heading, or the label a list item or bold paragraph starts with
                lines = page.read_text(encoding="utf-8").splitlines() if page.exists() else []
                headings[page] = [line.lstrip("#-* ") for line in lines if re.match(r"\s*(#|- |\*\*)", line)]
            if not any(h.startswith(name) for h in headings[page]):
                stale.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m[0]!r}")
    assert not stale, "sections cited but not there (the README's detail is in docs/):\n" + "\n".join(stale)
