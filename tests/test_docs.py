"""The user docs in docs/ stay true to the code: every link resolves, every cited file and
`path::name` exists, docs/metrics.md lists exactly the fields of the metrics.jsonl schema, and
code cites only docs that exist (never notes outside the repository)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_CITED_PATH = re.compile(r"^((?:metis_cli|tests|benchmarks|recipes|scripts)/[\w./-]*)(?:::([\w.]+))?$")
_DOC_CITATION = re.compile(r"docs/[\w-]+\.md")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def _defined_names(path: Path) -> dict[str, set[str]]:
    """{"": top-level names, class name: its member names} of a Python file."""
    tree = ast.parse(path.read_text())
    names: dict[str, set[str]] = {"": set()}

    def collect(body) -> set[str]:
        found = set()
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found |= {t.id for t in targets if isinstance(t, ast.Name)}
        return found

    names[""] = collect(tree.body)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = collect(node.body)
    return names


def test_docs_exist_with_an_index():
    assert {p.name for p in PAGES} >= {"README.md", "algorithm.md", "formats.md", "rl-step.md",
                                       "run-folder.md", "metrics.md"}
    index = (DOCS / "README.md").read_text()
    for page in PAGES:
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target in _LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        assert linked.exists(), f"{page.name}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: no heading #{anchor} in {linked.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_cited_code_exists(page):
    cited = 0
    for span in _CODE_SPAN.findall(page.read_text()):
        match = _CITED_PATH.match(span)
        if not match:
            continue
        cited += 1
        path, name = ROOT / match.group(1), match.group(2)
        assert path.exists(), f"{page.name}: cites missing {match.group(1)}"
        if name:
            owner, _, member = name.rpartition(".")
            names = _defined_names(path)
            assert owner in names, f"{page.name}: no class {owner} in {match.group(1)}"
            assert member in names[owner], f"{page.name}: no {name} in {match.group(1)}"
    if page.name != "README.md":
        assert cited, f"{page.name} cites no code; a page about the code should point at it"


def test_code_cites_only_docs_that_exist():
    outside_notes = "DESIGN" + ".md"  # split so this file does not cite it itself
    for folder in ("metis_cli", "tests", "benchmarks"):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text()
            where = source.relative_to(ROOT)
            assert outside_notes not in text, f"{where} cites {outside_notes}, which is not in the repository"
            for cited in _DOC_CITATION.findall(text):
                assert (ROOT / cited).is_file(), f"{where} cites {cited}, which does not exist"


_SECTION_STAGE = {"Both stages": "both", "SFT steps": "sft", "HDPO steps": "hdpo"}


def _metrics_page_rows() -> tuple[dict[str, str], set[str]]:
    """({field: stage of the section listing it}, {eval figure}) from docs/metrics.md's tables."""
    fields: dict[str, str] = {}
    figures: set[str] = set()
    section, header = None, None
    for line in (DOCS / "metrics.md").read_text().splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), None
            continue
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = cells[0]
            continue
        if set(cells[0]) <= set("-: "):
            continue
        name = cells[0].strip("`")
        if header == "figure":
            figures.add(name)
        else:
            assert name not in fields, f"docs/metrics.md lists {name} twice"
            fields[name] = _SECTION_STAGE.get(section, section)
    return fields, figures


def test_metrics_page_matches_the_schema():
    from metis_cli.telemetry import metrics

    documented, figures = _metrics_page_rows()
    schema = {field.name: field.stage for field in metrics.FIELDS}
    assert sorted(set(schema) - set(documented)) == [], "schema fields missing from docs/metrics.md"
    assert sorted(set(documented) - set(schema)) == [], "docs/metrics.md lists fields the schema lacks"
    wrong_section = {name: (documented[name], stage) for name, stage in schema.items() if documented[name] != stage}
    assert wrong_section == {}, "fields listed under another stage's section than the schema's"
    assert list(documented) == list(schema), "docs/metrics.md lists the fields in another order than FIELDS"
    assert figures == {figure.name for figure in metrics.EVAL_FIGURES}
