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


def test_xla_rows_add_options_on_top_of_the_defaults(monkeypatch):
    """--xla_row NAME:OPT=VAL,... is `auto` compiled with the pipeline's default XLA options
    plus these (later ones win); a malformed one is a usage error."""
    import pytest
    from absl import app

    from experiments import ablation
    from sdjax import pipeline

    monkeypatch.setattr(pipeline, "default_compiler_options", lambda: {"a": False, "b": 1})
    rows = ablation.xla_rows(["x:a=true,c=2.5", "y: d=on"])
    assert list(rows) == ["auto+x", "auto+y"]
    kernels, options = rows["auto+x"]
    assert kernels.attention == "auto" and kernels.group_norm == "auto"
    assert options == {"compiler_options": {"a": True, "b": 1, "c": 2.5}}
    assert rows["auto+y"][1] == {"compiler_options": {"a": False, "b": 1, "d": "on"}}
    for bad in ("x", "x:", ":a=1", "x:a"):
        with pytest.raises(app.UsageError, match="xla_row"):
            ablation.xla_rows([bad])


def test_malformed_xla_row_is_refused_before_any_work(tmp_path):
    proc = run_ablation(tmp_path, "--xla_row=nooptions")
    assert proc.returncode != 0
    assert "--xla_row wants NAME:OPTION=VALUE" in proc.stderr
    assert "Traceback" not in proc.stderr
