"""Running a snippet of Python in a fresh CPU process, for tests of experiment scripts that
define absl flags when imported (a second definition in the test process would be refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, *args: str, timeout: int = 120) -> str:
    """Runs `code` with the repository on the path and JAX on the CPU; asserts it exits 0 and
    returns its standard output."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def last_json_line(stdout: str):
    """The JSON value printed on the last line of `stdout`."""
    return json.loads(stdout.strip().splitlines()[-1])


def run_script(module: str, *argv: str, out_dir) -> str:
    """Runs `experiments.<module>`'s absl main with flags `argv` in a fresh CPU process whose
    $OUT (the scripts' `results_dir()`) is `out_dir`; asserts it exits 0, returns its stdout."""
    code = f"""
import importlib, os, sys
os.environ["OUT"] = {str(out_dir)!r}
sys.argv = [{module!r}, *{list(argv)!r}]
from absl import app
try:
    app.run(importlib.import_module("experiments." + {module!r}).main)
except SystemExit as e:
    assert not e.code, e.code
"""
    return run_python(code)
