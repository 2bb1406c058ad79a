"""The README's examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def shell_block_after(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    found = re.search(r"```sh\n(.*?)```", text[start:], re.DOTALL)
    assert found, f"no sh block after {heading!r}"
    return found.group(1)


def test_the_first_session_runs_as_written(tmp_path: Path) -> None:
    script = shell_block_after("A first session:")
    bin_dir = Path(sys.executable).parent
    script = script.replace(".venv/bin/", f"{bin_dir}/")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(["bash", "-e", "-c", script + "wait\n"], env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FILLED BUY 0.1 ETHUSDT at 3000" in done.stdout
    assert "Traceback" not in done.stderr
    assert "ALLOWED" in done.stdout  # governor status after `kill off`


@pytest.mark.timeout(300)
def test_the_backtest_examples_run_as_written(tmp_path: Path) -> None:
    script = shell_block_after("`tests/test_readme.py` runs them")
    bin_dir = Path(sys.executable).parent
    script = script.replace(".venv/bin/", f"{bin_dir}/")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "report.html").stat().st_size > 0
    assert (tmp_path / "model.joblib").exists()
    assert (tmp_path / "model.joblib.json").exists()
    assert "Traceback" not in done.stderr
