"""The documents are part of the product: their commands, tables and links must stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.config import settings_table
from tests.support.paths import ROOT

README = (ROOT / "README.md").read_text()
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")]
)


def fenced_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


def prose(text: str) -> str:
    """The text without its fenced code blocks (code may hold brackets that are not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", prose(path.read_text()), flags=re.M)}


def test_ci_runs_the_readme_test_command_verbatim():
    test_commands = [c for c in fenced_commands() if "pytest" in c]
    assert len(test_commands) == 1
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0] in ci_lines


def test_readme_run_command_installs_and_serves():
    run = fenced_commands()[0]
    assert "pip install" in run and "torch==" in run and run.endswith("invoke run-local")


def test_settings_table_matches_the_code():
    assert settings_table() in README


def test_catalog_table_matches_the_code():
    from service.catalog import CATALOG

    api = (ROOT / "docs" / "api.md").read_text()
    for entry in CATALOG:
        row = next(line for line in api.splitlines() if line.startswith(f"| {entry.hub_id} |"))
        memory = " | ".join(f"{entry.memory_gb(d)} GB" for d in ("bfloat16", "int8", "int4"))
        assert f"| {memory} |" in row


def test_readme_stays_an_introduction():
    assert len(README.splitlines()) <= 200


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_documents_resolve(document: Path):
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(document.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        file, _, fragment = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        assert path.exists(), f"{document.name} links to {target}, which does not exist"
        if fragment and path.suffix == ".md":
            assert fragment in anchors(path), f"{document.name} links to #{fragment}, not a heading of {file}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_speak_to_readers_not_to_the_project_history(document: Path):
    text = document.read_text()
    for pattern in (r"\bissues? #?\d+", r"\bthe seed\b", r"\bseed's\b"):
        assert not re.search(pattern, text, flags=re.I), f"{document.name}: {pattern!r}"


def test_every_speed_table_says_which_cpu_it_came_from():
    from service.dev.bench import HEADER

    text = (ROOT / "docs" / "performance.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    tables = [s for s in sections if re.search(r"^\| (precision|engine) \| load s \|", s, flags=re.M)]
    assert len(tables) == 4
    for section in tables:  # the bench's own CPU line: model name and the flags that choose kernels
        assert re.search(r"^CPU: (\w+ cap on )?AMD EPYC\b.*\bavx2\b", section, flags=re.M), section[:80]
    headings = [s.splitlines()[0] for s in tables]
    real, native, *capped = headings
    assert real.startswith("Real AVX2 host") and native.startswith("Native")
    assert HEADER in tables[0]  # the table the bench prints today, with the command that prints it
    assert re.search(r"^CPU: AMD EPYC \(family \d+, model \d+\): avx2; no avx512f", tables[0], flags=re.M)
    for heading, section in zip(capped, tables[2:], strict=True):  # the AVX-512 CPU held to an older set
        assert "cap on" in heading and "not a real" in heading
        assert re.search(r"^CPU: \w+ cap on AMD EPYC", section, flags=re.M)


def test_contributing_names_every_module_where_it_lives():
    """A new module is placed in the map a newcomer reads first, and a moved one leaves no stale line."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    named = set(re.findall(r"^((?:service|infra)/[\w/.-]+\.(?:py|j2))\s", text, flags=re.M))
    modules = {
        str(p.relative_to(ROOT))
        for pattern in ("service/**/*.py", "infra/**/*.py", "infra/**/*.j2")
        for p in ROOT.glob(pattern)
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert modules - named == set(), "modules missing from CONTRIBUTING.md's map"
    assert {n for n in named if not (ROOT / n).exists()} == set(), "CONTRIBUTING.md names missing modules"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_document_names_exists(document: Path):
    text = document.read_text()
    for path in re.findall(r"\b((?:service|infra|tests)/[\w/.-]*\w\.(?:py|js|j2|yaml|md))\b", text):
        assert (ROOT / path).exists(), f"{document.name} names {path}, which does not exist"
