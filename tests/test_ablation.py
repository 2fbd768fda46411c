"""experiments/ablation.py on CPU, on the `tiny` architecture: the rows run, every row's image is
compared with the float32 reference path, and the records are written (the GPU run is the same
script at full size)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_ablation(tmp_path, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "experiments.ablation", "--config=tiny", "--resolution=32",
         "--steps=2", "--repeats=1", "--noanchors", "--dtype=float32", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_rows_on_tiny(tmp_path):
    rows = "baseline_xla,auto,auto_conditioning_per_step,auto+layer_norm,auto_xla_options"
    proc = run_ablation(tmp_path, f"--rows={rows}", "--tag=_t")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "ablation_tiny_float32_t.json").read_text())
    assert [r["row"] for r in record["rows"]] == rows.split(",")
    for r in record["rows"]:
        assert "error" not in r and r["finite"]
        assert r["within_tolerance"], r
        assert r["unet_step_ms"] > 0 and r["total_ms"] > r["unet_step_ms"]
    by_name = {r["row"]: r for r in record["rows"]}
    # options as run: the kernel-free baseline with XLA's own defaults ({}), auto with the
    # pipeline's defaults (also {} on CPU; Triton GEMM fusions off on a GPU)
    assert by_name["auto_conditioning_per_step"]["options"] == {
        "hoist_conditioning": False,
        "compiler_options": {},
    }
    assert by_name["baseline_xla"]["options"] == {"compiler_options": {}}
    assert by_name["auto_xla_options"]["options"] == {"compiler_options": {}}
    assert by_name["auto+layer_norm"]["kernels"]["layer_norm"] == "pallas"
    assert (tmp_path / "ablation_tiny_float32_t.md").read_text().startswith("# Ablation: tiny")


def test_unknown_row_is_refused(tmp_path):
    proc = run_ablation(tmp_path, "--rows=baseline_xla,fastest")
    assert proc.returncode != 0
    assert "unknown rows ['fastest']" in proc.stderr
    assert "Traceback" not in proc.stderr
