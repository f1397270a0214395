"""The README's code runs as written, and its two commands are the ones CI uses."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_run():
    examples = blocks("python")
    assert len(examples) >= 3
    for code in examples:
        exec(compile(code, "README.md", "exec"), {})


def test_two_commands_and_ci_runs_the_test_command():
    commands = [b.strip() for b in blocks("bash")]
    assert commands == [
        'pip install ".[onnx]" && quantize demo',
        'pip install ".[test]" && python -m pytest',
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install ".[test]"' in ci and "python -m pytest" in ci
