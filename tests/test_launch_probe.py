"""experiments/launch_probe.py: its timing helper, and the script on `tiny` (CPU in CI; on the
GPU the same code times the pipeline's programs, `gpu_session.sh launch`)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from experiments import launch_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_time_calls_keeps_outputs_only_when_asked():
    seen = []

    def call(x):
        out = x + 1
        seen.append(out)
        return out

    x = jnp.arange(4.0)
    r = launch_probe.time_calls(call, [x], keep=False, calls=3)
    assert len(seen) == 5  # two warm-up calls, three timed
    assert len(r["walls_ms"]) == 3 and 0 < r["dispatch_ms"] <= r["wall_ms"]


def test_fresh_copies_are_distinct_buffers_with_equal_values():
    x = jnp.arange(8.0)
    copies = launch_probe.fresh_copies(x, 3)
    assert len({c.unsafe_buffer_pointer() for c in copies} | {x.unsafe_buffer_pointer()}) == 4
    for c in copies:
        assert bool(jnp.all(c == x))


def test_probe_refuses_unknown_components_and_no_calls():
    with pytest.raises(ValueError, match="unknown components"):
        launch_probe.probe("tiny", None, "reference", components=("unet",))
    with pytest.raises(ValueError, match="calls must be"):
        launch_probe.probe("tiny", None, "reference", calls=0)


def test_command_line_on_tiny(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.launch_probe", "--config=tiny", "--steps=2",
         "--calls=2", "--arg_counts=1,20", "--tag=_t"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "launch_probe_tiny_float32_t.json").read_text())
    rows = {(r["program"], r["setting"], r["case"]): r for r in record["rows"]}
    programs = {"text_encoder", "vae_decode", "tiny_1_args", "tiny_20_args"}
    for program in programs | {"denoise"}:
        for case in launch_probe.CASES:
            r = rows[(program, "default", case)]
            assert 0 < r["dispatch_ms"] <= r["wall_ms"] and len(r["walls_ms"]) == 2
    # with command buffers off: every program but the denoising loop (compiled once)
    assert {p for p, s, _ in rows if s == "no_command_buffers"} == programs
    assert "| program | setting | case |" in proc.stdout
