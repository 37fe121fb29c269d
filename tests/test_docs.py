"""The README is the front door and reports/README.md holds the results: every relative link in both resolves
(file, folder or heading anchor), and the README keeps its results to the four-row summary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "reports/README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in markdown.read_text().splitlines() if line.startswith("#")}


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no such path)")
        elif anchor and anchor not in anchors(file):
            broken.append(f"{target} (no heading with that anchor in {file.name})")
    return broken


def test_github_anchor_follows_githubs_rule():
    assert github_anchor(" NEU-CLS, k = 10 (issue 12)") == "neu-cls-k--10-issue-12"
    assert github_anchor("The line model: the machine's limit") == "the-line-model-the-machines-limit"


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    assert not broken_links(REPO / doc), broken_links(REPO / doc)


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n[ok](#title) [gone](missing.md) [bad anchor](#nowhere) [web](https://x.org)\n")
    assert broken_links(tmp_path / "a.md") == ["missing.md (no such path)", "#nowhere (no heading with that anchor in a.md)"]


def test_readme_keeps_results_to_the_summary_and_links_them():
    readme = (REPO / "README.md").read_text()
    summary = readme.split("## Results in four rows", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 4, "the README's results summary is a header and four rows"
    assert "reports/README.md" in summary
    results = (REPO / "reports" / "README.md").read_text()
    for section in ("NEU-CLS, k = 10", "Issue 22", "NEU-CLS, k = 30", "issue 15", "embedded default demo"):
        assert any(line.startswith("## ") and section in line for line in results.splitlines()), section
        assert not any(line.startswith("## ") and section in line for line in readme.splitlines()), section
