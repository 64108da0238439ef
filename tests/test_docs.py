"""The README is part of the product: its commands and tables must stay true."""

from __future__ import annotations

import re

from service.config import settings_table
from tests.support.paths import ROOT

README = (ROOT / "README.md").read_text()


def fenced_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


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

    for entry in CATALOG:
        row = next(line for line in README.splitlines() if line.startswith(f"| {entry.hub_id} |"))
        memory = " | ".join(f"{entry.memory_gb(d)} GB" for d in ("bfloat16", "int8", "int4"))
        assert f"| {memory} |" in row
