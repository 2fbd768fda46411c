"""experiments/trace_generate.py: the gap analysis on made-up events, and the script on `tiny`
(CPU in CI; on the GPU the same code reads the device's kernels)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import trace_generate
from experiments.profile import KernelEvent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _event(name, start_us, dur_us, module):
    return KernelEvent(name=name, start_ns=start_us * 1e3, dur_ns=dur_us * 1e3, line="stream",
                       hlo_module=module)  # fmt: skip


def test_component_of_names_the_pipeline_programs():
    assert trace_generate.component_of("jit_encode_text") == "text_encoder"
    assert trace_generate.component_of("jit_encode_image") == "vae_encode"
    assert trace_generate.component_of("jit_denoise_loop") == "denoise"
    assert trace_generate.component_of("jit_decode") == "vae_decode"
    assert trace_generate.component_of(None) == "other"


def test_analyse_counts_busy_idle_and_gaps():
    events = [
        _event("a", 0, 10, "jit_encode_text"),
        _event("b", 5, 10, "jit_encode_text"),  # overlaps a: busy 0-15
        _event("c", 115, 20, "jit_denoise"),  # 100 us after the text encoder
        _event("d", 140, 10, "jit_denoise"),  # 5 us gap inside the loop
        _event("e", 170, 30, "jit_decode"),  # 20 us after it
    ]
    r = trace_generate.analyse(events, top_gaps=2)
    assert r["kernels"] == 5
    assert r["kernel_ms"] == pytest.approx(80e-3)
    assert r["busy_ms"] == pytest.approx(75e-3)
    assert r["span_ms"] == pytest.approx(200e-3)
    assert r["idle_ms"] == pytest.approx(125e-3)
    assert r["gaps_over_10us"] == 2 and r["idle_in_gaps_over_10us_ms"] == pytest.approx(0.12)
    text, loop, vae = (r["components"][k] for k in ("text_encoder", "denoise", "vae_decode"))
    assert text["busy_ms"] == pytest.approx(15e-3) and text["idle_before_ms"] is None
    assert loop["idle_before_ms"] == pytest.approx(0.1)
    assert loop["idle_inside_ms"] == pytest.approx(5e-3) and loop["span_ms"] == pytest.approx(35e-3)
    assert vae["idle_before_ms"] == pytest.approx(20e-3) and vae["starts_at_ms"] == 0.17
    top = r["top_gaps"]
    assert [g["gap_us"] for g in top] == [100.0, 20.0]
    assert top[0]["before"] == "text_encoder: b" and top[0]["after"] == "denoise: c"
    with pytest.raises(ValueError, match="no kernel events"):
        trace_generate.analyse([])


def test_command_line_on_tiny(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.trace_generate", "--config=tiny", "--steps=2",
         "--tag=_t", "--impl=conv3x3=reference"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "trace_generate_tiny_float32_t.json").read_text())
    assert set(record["modes"]) == {"sync", "unsync", "one_program"}
    assert record["kernels"] == "auto+conv3x3=reference"  # the preset with --impl's change
    for mode, m in record["modes"].items():
        assert m["wall_ms"] > 0 and m["kernels"] > 0 and 0 < m["busy_ms"] <= m["span_ms"]
        parts = {"image"} if mode == "one_program" else {"text_encoder", "denoise", "vae_decode"}
        assert parts <= set(m["components"]), mode
    assert "end_to_end" in record["modes"]["unsync"]["timings"]
    assert set(record["modes"]["one_program"]["timings"]) == {"image", "end_to_end"}
    assert "## sync" in proc.stdout and "Longest idle gaps" in proc.stdout
