"""The docs stay true: every console example in README.md and docs/*.md is run, and its output checked.

A console example is a line starting with ``$ `` inside a fenced block; the lines under it, up to the
next ``$ `` line or the block's end, are the output the page shows. Each shown line must appear in
what the command printed, in order (spaces normalised; ``...`` inside a line matches anything, a line
that is only ``...`` stands for lines left out; a trailing ``  # comment`` is the page's remark, not
output). A command whose shown output holds ``error:`` must exit 2, every other command 0. The
examples of one page run in order in one fresh folder holding the files the pages refer to, so a page
reads as one session: train, then predict from its checkpoint. ``cropyield-serve`` starts in the
background (on a free port where the page says 8000) and is stopped when the page ends.

Commands written inline in the prose (``cropyield fit --config fast.yaml``) are parsed by the CLI
itself (``--print_config``), so a renamed or mistyped flag fails here too.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cropyield.cli import cli_main

from .conftest import BIN

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBCOMMANDS = ("fit", "validate", "test", "predict")


@dataclass
class Example:
    page: Path
    line: int
    command: str
    output: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: $ {self.command}"


def examples(page: Path) -> list[Example]:
    """The ``$ `` examples of a page, each with the output lines shown under it."""
    found, fenced, current = [], False, None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, current = not fenced, None
            continue
        if not fenced:
            continue
        if line.startswith("$ "):
            current = Example(page, number, line[2:].strip())
            found.append(current)
        elif current is not None:
            current.output.append(line)
    return found


def inline_commands(page: Path) -> list[tuple[int, str]]:
    """``cropyield <subcommand> ...`` written in backticks in the prose (a span may wrap a line)."""
    found, fenced, paragraph, start = [], False, [], 0
    for number, line in enumerate([*page.read_text().splitlines(), ""], 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or line.lstrip().startswith("```") or not line.strip():
            text = " ".join(paragraph)
            found += [
                (start, span) for span in re.findall(r"`(cropyield (?:fit|validate|test|predict)(?: [^`]*)?)`", text)
            ]
            paragraph = []
        else:
            start = start if paragraph else number
            paragraph.append(line.strip())
    return found


def _normal(text: str) -> str:
    return " ".join(text.split())


def _shown(line: str) -> str | None:
    """The output a shown line promises (None: nothing to check)."""
    line = re.sub(r"\s{2,}#.*$", "", line)
    return _normal(line) or None


def check_output(example: Example, printed: str) -> None:
    lines = [_normal(line) for line in printed.splitlines()]
    position = 0
    for shown in filter(None, map(_shown, example.output)):
        if shown == "...":
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in shown.split("...")))
        for i in range(position, len(lines)):
            if pattern.fullmatch(lines[i]):
                position = i + 1
                break
        else:
            raise AssertionError(f"{example}\nthe page shows:\n  {shown}\nwhich it did not print:\n{printed}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _workspace(folder: Path) -> None:
    """The files the pages refer to: the two regions usage.md shows, a small folder of crop files, the scripts."""
    (folder / "scripts").symlink_to(ROOT / "scripts")
    (folder / "regions.csv").write_text('region,temp,rainfall,humidity\n"Nord, haut",75,63,44\nSud,80,70,50\n')
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_data.py"), "--rows", "20000", "--files", "2", "--out", "crops/"],
        cwd=folder,
        check=True,
        capture_output=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if examples(p)], ids=lambda p: p.name)
def test_docs_console_examples_run_and_print_what_the_page_shows(page, tmp_path):
    _workspace(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    port, servers, failures = str(_free_port()), [], []
    try:
        for example in examples(page):
            command = example.command.replace("8000", port)
            if command.startswith("cropyield-serve"):
                servers.append(subprocess.Popen(["bash", "-c", "exec " + command], cwd=tmp_path, env=env))
                _wait_healthy(port, servers[-1])
                continue
            result = subprocess.run(
                ["bash", "-c", command], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            expected = 2 if any("error:" in line for line in example.output) else 0
            printed = result.stdout + result.stderr
            if result.returncode != expected:
                failures.append(f"{example}\nrc={result.returncode}, not {expected}\n{printed}")
            else:
                try:
                    check_output(example, printed)
                except AssertionError as err:
                    failures.append(str(err))
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    assert not failures, "\n\n".join(failures)


def _wait_healthy(port: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.3)
    raise AssertionError("the server did not become healthy")


@pytest.mark.parametrize(
    ("page", "line", "command"),
    [(p, n, c) for p in PAGES for n, c in inline_commands(p)],
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_docs_inline_commands_parse(page, line, command):
    args = shlex.split(command)[1:]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as stop:
        cli_main([*args, "--print_config"])
    assert stop.value.code in (0, None), f"{page.name}:{line}: `{command}` does not parse"
