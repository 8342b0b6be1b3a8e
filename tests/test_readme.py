"""The docs: flags are documented in --help (every flag has help text), README.md is a
manual of at most 20 KB whose install and test commands CI runs, DESIGN.md at most 25 KB."""

import argparse
import importlib
import sys

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()
COMMANDS = sorted(p.stem for p in ROOT.glob("*_optimized.py")) + ["vit_small", "clip_vit", "tkp_deploy"]
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))


def parser_of(name: str) -> argparse.ArgumentParser:
    if name in BENCHMARKS and str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name).get_args_parser()


@pytest.mark.parametrize("name", COMMANDS + BENCHMARKS)
def test_every_flag_has_help_text(name):
    parser = parser_of(name)
    bare = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
            if not a.help or a.help == argparse.SUPPRESS]
    assert not bare, f"{name}: flags without help text: {bare}"


@pytest.mark.parametrize("name", COMMANDS + BENCHMARKS)
def test_the_readme_names_every_command(name):
    assert f"{name}.py" in README, f"README.md does not mention {name}.py"


def test_docs_stay_short():
    assert len(README.encode()) <= 20 * 1024, "README.md over 20 KB: flags go to --help, figures to RESULTS.md"
    assert len((ROOT / "DESIGN.md").read_bytes()) <= 25 * 1024, "DESIGN.md over 25 KB: say each fact once"


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.startswith("python")]
    assert commands == ["python -m pip install -r requirements.txt", "python -m pytest -q tests"]
    for command in commands:
        assert f"\n{command}\n" in README, command
