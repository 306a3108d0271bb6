"""The README matches the code: its runnable shell blocks run, its links resolve, and its test
command is the one CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = re.compile(r"<!--\s*runnable\s*-->\s*\n```(?:bash|sh)\n(.*?)\n```", re.S)


def runnable_blocks() -> list[str]:
    return RUNNABLE.findall(README.read_text(encoding="utf-8"))


def test_readme_has_runnable_blocks():
    assert len(runnable_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_runnable_block(index, tmp_path):
    block = runnable_blocks()[index]
    env = dict(os.environ)
    # the commands of this environment (the venv the tests run in) come first
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("LESIONDIFFUSION_CATALOG_PATH", None)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"README block {index} failed:\n{block}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


def test_readme_top_commands_match_ci():
    text = README.read_text(encoding="utf-8")
    head = text[: text.index("## What it is")]
    assert "pip install . && lesiondiffusion demo" in head
    assert 'pip install ".[test]" && python -m pytest -q tests' in head
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q tests" in ci and '".[test]"' in ci


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(((?!https?://|#)[^)#\s]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_readme_names_real_commands():
    """Every `lesiondiffusion <command>` the README mentions exists in the CLI."""
    from lesiondiffusion.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    known = set(sub.choices)
    # `lesiondiffusion <word>` in code spans and blocks (prose such as the title is not a command)
    used = set(re.findall(r"(?:^|[`$(\s])lesiondiffusion ([a-z]+)", README.read_text(encoding="utf-8"), re.M))
    used.discard("for")
    missing = sorted(used - known)
    assert not missing, f"README mentions unknown commands: {missing}"
