"""Every ``pgpcl train`` and ``pgpcl demo`` command the docs show names a real preset and valid keys.

The commands are read from the README and docs/*.md (code blocks and inline code), resolved as the CLI
would resolve them, and not run: a renamed preset or key breaks this test, not a user's first try.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pgpcl.cli import build_parser, demo_methods, split_seeds
from pgpcl.config import load_config
from pgpcl.demo import demo_configs

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Placeholders the docs use for values a user picks.
PLACEHOLDERS = {"S": "0", "DIR": "/tmp/docs_runs", "NAME": "n", "EPS": "0.9", "TARGET": "update", "LR": "0.05"}


def _commands(text: str) -> list[str]:
    """``pgpcl train ...`` / ``pgpcl demo ...`` lines of code blocks, and inline code spans."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        found += [line for line in block.splitlines() if re.match(r"\s*(\.venv/bin/)?pgpcl (train|demo)\b", line)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = re.findall(r"`((?:\.venv/bin/)?pgpcl (?:train|demo)\b[^`]*)`", prose)
    found += [" ".join(span.split()) for span in spans if len(span.split()) > 2]  # may wrap; a bare name is prose
    return found


def _words(command: str) -> list[str]:
    command = re.sub(r"\s\[[^\]]*\]", " ", command.split("&&")[-1])  # [optional parts]
    words = shlex.split(command, comments=True)
    return [_fill(w) for w in words[1:]]  # after 'pgpcl'


def _fill(word: str) -> str:
    key, sep, value = word.partition("=")
    if sep and value in PLACEHOLDERS:
        return f"{key}={PLACEHOLDERS[value]}"
    return PLACEHOLDERS.get(word, word)


COMMANDS = sorted({(doc.name, c.strip()) for doc in DOCS for c in _commands(doc.read_text())})


def test_the_docs_show_commands():
    assert sum(1 for _, c in COMMANDS if " train " in c) >= 20 and any(" demo" in c for _, c in COMMANDS)


@pytest.mark.parametrize(("doc", "command"), COMMANDS)
def test_a_documented_command_resolves(doc, command):
    args = build_parser().parse_args(_words(command))  # the CLI's own parser, as the user's shell gives it
    if args.command == "demo":
        seeds, overrides = split_seeds(args.seeds or [], args.overrides)
        assert demo_configs(Path(args.out), seeds or [0], args.quick, overrides, demo_methods(args.methods))
    elif args.resume is None:  # a resumed run names a run folder, not a config
        assert load_config(args.config, args.overrides).name


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    (block,) = _python_blocks(ROOT / "README.md")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "tiny_l2p_pgp" in out and "l2p-PGP" in out  # each run's line, then the report's table
    assert (tmp_path / "runs/api/tiny_l2p_pgp/seed0/results.json").is_file()
