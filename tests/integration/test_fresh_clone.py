"""A newcomer's clone: the README's two commands, in that order, in a fresh clone with nothing beside it.

`./ai version` stands in for `./ai` (same launcher, no image build), and `./tests/run -m unit` for the whole suite
(same launcher with the test extras, ruff, then pytest; only the unit tier). What this catches: a venv made by a plain
`./ai` taken as ready for the tests (no ruff), and unit tests that need files only this project's machines have.

Opt-in (AI_TEST_FRESH_CLONE=1; CI sets it): it installs two virtual environments with the host's own pip
configuration (pip's cache is reused), which takes minutes and reaches whatever package index pip is set up with.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OPT_IN = "AI_TEST_FRESH_CLONE"


def _env(tmp: Path) -> dict[str, str]:
    # Nothing of this checkout's set-up leaks in: no venv, extras, spec path or cache of ours.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AI_", "FC_", "VIRTUAL_ENV", "PYTEST"))}
    return env | {"AI_SANDBOX_CACHE": str(tmp / "image-cache")}


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_readme_commands_in_a_fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not os.environ.get(OPT_IN):
        pytest.skip(f"set {OPT_IN}=1 to run it: it installs two virtual environments in a fresh clone (minutes)")
    tmp = tmp_path_factory.mktemp("fresh")
    clone = tmp / "clone"  # nothing beside it: no ../shared
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    env = _env(tmp)
    venv = clone / ".venv"

    # 1. ./ai (first run: host packages, a venv without the test extras)
    assert _run(["./ai", "version"], clone, env, 900).stdout.startswith("ai-sandbox ")
    assert (venv / "bin/ai").is_file() and not (venv / "bin/ruff").exists()

    # 2. ./tests/run: the same venv must be upgraded with the test extras, ruff must run, the unit tier pass
    res = _run(["./tests/run", "-m", "unit", "-p", "no:cacheprovider"], clone, env, 1200)
    assert (venv / "bin/ruff").is_file() and (venv / "bin/pytest").is_file()
    assert "All checks passed!" in res.stdout  # ruff ran over src and tests
    assert " passed" in res.stdout.splitlines()[-1], res.stdout[-2000:]
    # The Firecracker contract tests say why they skip: the spec they need is not shipped with the project.
    assert "firecracker-api-v1.17.0-dev.yaml is not here" in res.stdout, res.stdout[-3000:]

    # 3. ./ai again: the upgraded venv is kept as it is (no reinstall)
    stamps = sorted(p.name for p in venv.glob(".ai-sandbox-*"))
    _run(["./ai", "version"], clone, env, 60)
    assert sorted(p.name for p in venv.glob(".ai-sandbox-*")) == stamps and stamps[0].endswith("-test")
