"""The README's two set-up commands are the contract with users and CI: keep them in sync."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_two_setup_commands():
    commands = _commands()
    assert len(commands) >= 2
    quick, tests = commands[0], commands[1]
    assert "pip install torch==2.13.0" in quick and "qfx quantize --model smollm2-135m" in quick
    assert "pip install torch==2.13.0" in tests and "pytest" in tests
    # the first two code blocks come before any other prose section
    assert (ROOT / "README.md").read_text().index(tests) < (ROOT / "README.md").read_text().index("## ")


def test_ci_runs_the_readme_test_command_verbatim():
    assert _commands()[1] in (ROOT / ".ci" / "run").read_text()
