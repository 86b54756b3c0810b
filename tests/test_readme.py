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


def test_the_use_example_defines_every_name_it_uses():
    import ast
    import builtins

    block = re.search(r"## Use\n\n```python\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
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
