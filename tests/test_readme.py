"""The README's two set-up commands are the contract with users and CI: keep them in sync."""

import re
from pathlib import Path

import pytest

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


def test_the_readme_is_a_short_front_door_and_its_pages_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 180
    for page in re.findall(r"`((?:docs/[\w-]+|ARCHITECTURE|benchmarks/README)\.md)`", text):
        assert (ROOT / page).is_file(), page


def test_ci_runs_the_readme_test_command_verbatim():
    assert _commands()[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("page, heading", [("README.md", "## Use"), ("docs/api.md", "# The Python API")])
def test_the_use_examples_define_every_name_they_use(page, heading):
    import ast
    import builtins

    block = re.search(heading + r"\n\n```python\n(.+?)\n```", (ROOT / page).read_text(), re.S).group(1)
    tree = ast.parse(block)
    defined = set(dir(builtins))
    for statement in tree.body:  # in order: a name must be bound before a later statement reads it
        loads = {n.id for n in ast.walk(statement) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        if isinstance(statement, ast.For):  # the loop variable is bound by the statement itself
            loads -= {n.id for n in ast.walk(statement.target) if isinstance(n, ast.Name)}
        assert loads <= defined, f"line {statement.lineno}: {sorted(loads - defined)} not defined before use"
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)
