"""README.md is the user's manual: every flag of every script is in it, and CI runs the
install and test commands it shows."""

import importlib

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()
SCRIPTS = sorted(p.stem for p in ROOT.glob("*_optimized.py")) + ["vit_small", "clip_vit"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_is_documented(name):
    parser = importlib.import_module(name).get_args_parser()
    flags = {s for action in parser._actions for s in action.option_strings if s.startswith("--") and s != "--help"}
    missing = sorted(f for f in flags if f"`{f}" not in README)
    assert not missing, f"{name}: flags missing from README.md: {missing}"


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.startswith("python")]
    assert commands == ["python -m pip install -r requirements.txt", "python -m pytest -q tests"]
    for command in commands:
        assert f"\n{command}\n" in README, command
