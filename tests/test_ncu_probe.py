"""`experiments/ncu_probe.py` as the `ncu` stage runs it, on the CPU (interpret mode): each op
runs once, is checked against its reference, and an unknown op is a usage error."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _probe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "experiments/ncu_probe.py", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_probe_runs_and_checks_each_op():
    done = _probe("--ops=group_norm_64x320,geglu_16,cross_64_all_heads")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "relative error" in line]
    ops = [line.split(":")[0] for line in lines]
    assert ops == ["group_norm_64x320", "geglu_16", "cross_64_all_heads"]
    assert all(line.endswith(" ok") for line in lines), lines


def test_unknown_op_is_a_usage_error():
    done = _probe("--ops=group_norm_64x320,no_such_op")
    assert done.returncode != 0
    assert "unknown ops ['no_such_op']" in done.stderr and "Traceback" not in done.stderr
