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


def test_host_launches_counts_the_launching_api_calls_in_the_loop_window():
    """Only launching API calls (driver or runtime names, with suffixes) inside the window
    count; per step divides by the steps."""
    match = trace_generate.LAUNCH_API.match
    assert match("cuLaunchKernelEx") and match("cudaLaunchKernel") and match("cuGraphLaunch")
    assert match("cuMemcpyHtoDAsync_v2") and match("cuMemsetD8Async")
    assert not match("cuStreamSynchronize") and not match("cuEventRecord")
    assert not match("cuMemcpyHtoD_v2")  # a synchronous copy launches nothing to wait on
    api = [("cuGraphLaunch", 5.0), ("cuGraphLaunch", 10.0), ("cuLaunchKernelEx", 12.0),
           ("cuGraphLaunch", 30.0), ("cuLaunchKernelEx", 1.0)]  # fmt: skip
    r = trace_generate.host_launches(api, 5.0, 20.0, steps=2)
    assert r == {"calls": {"cuGraphLaunch": 2, "cuLaunchKernelEx": 1},
                 "per_step": {"cuGraphLaunch": 1.0, "cuLaunchKernelEx": 0.5}}  # fmt: skip
    assert trace_generate.host_launches([], 0.0, 1.0, steps=1) == {"calls": {}, "per_step": {}}


def test_host_api_events_reads_host_planes_only(monkeypatch, tmp_path):
    """The xplane's "/host:" planes are read, launching names kept; no reader, no events."""
    from experiments import profile

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.xplane.pb").write_bytes(b"")
    seen = []

    def raw(path, prefix):
        seen.append(prefix)
        yield ("/host:CUPTI", "t", "cuGraphLaunch", 7.0, 1.0, {})
        yield ("/host:CUPTI", "t", "cuStreamSynchronize", 8.0, 1.0, {})

    monkeypatch.setattr(profile, "_profile_data_class", lambda: object)
    monkeypatch.setattr(profile, "_raw_from_xplane", raw)
    assert trace_generate.host_api_events(str(tmp_path)) == [("cuGraphLaunch", 7.0)]
    assert seen == ["/host:"]
    monkeypatch.setattr(profile, "_profile_data_class", lambda: None)
    assert trace_generate.host_api_events(str(tmp_path)) == []


def test_loop_kernels_by_family_and_step_sequence():
    """Two steps of [gemm, add_fusion_N, gn] after a one-kernel prologue: per step launches,
    kernel time and the idle before each family; the sequence is one step's kernels with
    medians over the steps, the prologue left out."""
    names = ["prologue", "nvjet_a", "loop_add_fusion_1", "sdjax_gn",
             "nvjet_a", "loop_add_fusion_7", "sdjax_gn"]  # fmt: skip
    starts = [0, 10, 30, 33, 50, 70, 75]  # us
    durs = [10, 20, 2, 7, 20, 4, 5]
    events = [_event(n, s, d, "jit_denoise") for n, s, d in zip(names, starts, durs, strict=True)]
    r = trace_generate.loop_kernels(events, steps=2)
    fam = {f["family"]: f for f in r["families"]}
    assert set(fam) == {"prologue", "nvjet_a", "loop_add_fusion", "sdjax_gn"}
    assert fam["nvjet_a"]["launches"] == 1.0 and fam["nvjet_a"]["kernel_ms"] == pytest.approx(0.02)
    # idle before nvjet_a: 0 (after the prologue) and 50 - 40 = 10 us, over two steps
    assert fam["nvjet_a"]["idle_before_ms"] == pytest.approx(5e-3)
    assert fam["loop_add_fusion"]["us_each"] == pytest.approx(3.0)
    assert fam["sdjax_gn"]["idle_before_ms"] == pytest.approx(1e-3)  # 1 + 1 us over two steps
    assert r["families"][0]["family"] == "nvjet_a"  # by kernel time
    assert r["kernel_ms"] == pytest.approx(0.034) and r["idle_ms"] == pytest.approx(0.006)
    seq = r["sequence"]
    assert [k["family"] for k in seq] == ["nvjet_a", "loop_add_fusion", "sdjax_gn"]
    assert seq[0]["us"] == 20.0 and seq[1]["us"] == 3.0 and seq[2]["us"] == 6.0
    assert seq[0]["idle_before_us"] == pytest.approx(5.0)  # median of 0 and 10
    assert trace_generate.step_sequence(events[:3], steps=3) is None  # no period of 3 steps


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
    loop = record["modes"]["unsync"]["loop_kernels"]
    assert loop["launches"] > 0 and loop["kernel_ms"] > 0 and loop["families"]
    assert "The loop's kernels by name family" in proc.stdout
    if loop["sequence"]:  # the tiny loop's steps have a period: its idle table is printed
        assert "One step's longest idle before a kernel" in proc.stdout
