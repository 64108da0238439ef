"""Print the requirements the image installs: `[project].dependencies` less the host-only ones.

`pip install -e .` on the host brings everything the tasks need (invoke, rich, the Azure SDK ...), but the
container runs only the service, and every megabyte of the image is the Azure VM's cold start. The
host-only names live next to the dependencies, in `[tool.qwen-box] host-only` of pyproject.toml. The
Dockerfile runs this file in its build (stdlib only, Python 3.11); the tests run it on the host.

    python infra/image_requirements.py pyproject.toml
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (case, `-`, `_` and `.` do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0])


def image_requirements(pyproject: dict) -> list[str]:
    """The dependencies whose names are not listed as host-only."""
    host_only = {canonical(n) for n in pyproject.get("tool", {}).get("qwen-box", {}).get("host-only", [])}
    return [r for r in pyproject["project"]["dependencies"] if requirement_name(r) not in host_only]


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "pyproject.toml")
    with path.open("rb") as f:
        print("\n".join(image_requirements(tomllib.load(f))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
