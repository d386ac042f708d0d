from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_test_command_that_readme_shows() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```\n(sudo [^\n]+)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c).removeprefix("sudo ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, f"{test_command!r} is not a line of .ci/run"
