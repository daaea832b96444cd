"""Every command in the README and the docs still parses with the command line as it is, and every code block
is either run by a test or marked with what it needs that tests do not have (the official weights, a GPU, hours).

A renamed or removed option, a wrong choice value or a command that no longer exists fails here, although the
commands themselves need files a test does not have: they are parsed by click (types and choices checked), not
run. The README's first-result block is run as written by tests/test_readme.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from codec.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# What a block may be marked with, in an HTML comment on the line before it: <!-- needs: official weights -->
NEEDS = ("official weights", "a GPU", "hours of compute", "an install", "run by tests/test_readme.py", "run by .ci/run")
BLOCK = re.compile(r"(?:<!--\s*needs:\s*([^>]*?)\s*-->\s*\n)?```(bash|python|sh)\n(.*?)```", flags=re.S)


def _blocks() -> list[tuple[str, str | None, str, str]]:
    """(file, marker, language, code) of every shell or Python block."""
    out = []
    for path in DOCS:
        for m in BLOCK.finditer(path.read_text(encoding="utf-8")):
            out.append((str(path.relative_to(ROOT)), m.group(1), m.group(2), m.group(3)))
    return out


def _commands(code: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped, ``&&`` chains split."""
    text = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in text.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            commands.append(shlex.split(part.replace("~", "/home/user")))
    return commands


def _cascade_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``cascade`` (also ``python -m codec.cli`` and ``torchrun … -m codec.cli``), else None."""
    if argv and argv[0] == "cascade":
        return argv[1:]
    if "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["codec.cli"]:
        return argv[argv.index("-m") + 2:]
    return None


def _parse(args: list[str]) -> None:
    """Resolve the (sub)command and let click parse its options and arguments, without running it."""
    command: click.Command = main
    ctx = None
    name = "cascade"
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"no command {name} {args[0]}"
        name, command, args = f"{name} {args[0]}", sub, args[1:]
    ctx = command.make_context(name, list(args), parent=ctx)
    assert ctx.params is not None


CASES = _blocks()


def test_the_docs_have_code_blocks():
    assert len(CASES) >= 15


@pytest.mark.parametrize("where, marker, language, code", CASES, ids=[f"{c[0]}#{i}" for i, c in enumerate(CASES)])
def test_every_command_parses_and_every_block_is_run_or_marked(where, marker, language, code):
    if marker is not None:
        assert any(marker.startswith(n) for n in NEEDS), f"{where}: unknown marker {marker!r}; use one of {NEEDS}"
    if language == "python":
        assert marker is not None, f"{where}: a Python block must be run by a test or marked <!-- needs: … -->"
        compile(code, where, "exec")
        return
    unchecked = []
    for argv in _commands(code):
        args = _cascade_args(argv)
        if args is not None:
            _parse(args)
        elif argv[:1] == ["python"] and argv[1:2] and argv[1].startswith("scripts/"):
            assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
        elif argv[:1] == ["bash"]:
            assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
        else:
            unchecked.append(argv[0])
    assert not unchecked or marker is not None, (
        f"{where}: {', '.join(sorted(set(unchecked)))} cannot be checked here; mark the block <!-- needs: … -->")
