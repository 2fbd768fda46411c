"""experiments/ablation.py on CPU, on the `tiny` architecture: the rows run, every row's image is
compared with the float32 reference path, and the records are written (the GPU run is the same
script at full size)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests._subprocess import last_json_line, run_python

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_ablation(tmp_path, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "experiments.ablation", "--config=tiny", "--resolution=32",
         "--steps=2", "--repeats=1", "--noanchors", "--dtype=float32", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_rows_on_tiny(tmp_path):
    rows = ("baseline_xla,auto,auto_conditioning_per_step,auto_unshared_guidance,"
            "auto+layer_norm,auto_xla_options")  # rows run in the table's order
    proc = run_ablation(tmp_path, f"--rows={rows}", "--tag=_t")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "ablation_tiny_float32_t.json").read_text())
    assert [r["row"] for r in record["rows"]] == rows.split(",")
    for r in record["rows"]:
        assert "error" not in r and r["finite"]
        assert r["within_tolerance"], r
        assert r["unet_step_ms"] > 0 and r["total_ms"] > r["unet_step_ms"]
        # the image's wall covers its components; the unwaited runs (--end_to_end_repeats,
        # default 3) make the same image
        assert r["end_to_end_ms"] >= r["total_ms"] > 0
        assert r["end_to_end_unsync_ms"] > 0 and r["end_to_end_same_image"], r
        # and as one program: timed, its image the components' within a uint8 level, and
        # checked against the reference as the row's is
        assert r["end_to_end_one_program_ms"] > 0 and r["one_program_compile_s"] > 0
        assert r["one_program_image_max_diff"] <= 1
        assert r["one_program_latent_rel_error"] < 2 * r["latent_rel_error"] + 1e-6, r
        assert set(r["compile_s_by_component"]) == {"text_encoder", "denoise", "vae_decode"}
        assert r["compile_s"] == pytest.approx(sum(r["compile_s_by_component"].values()))
    by_name = {r["row"]: r for r in record["rows"]}
    # options as run: the kernel-free baseline with XLA's own defaults ({}), auto with the
    # pipeline's defaults (also {} on CPU; Triton GEMM fusions off on a GPU)
    assert by_name["auto_conditioning_per_step"]["options"] == {
        "hoist_conditioning": False,
        "compiler_options": {},
    }
    assert by_name["auto_unshared_guidance"]["options"] == {
        "share_guidance_prefix": False,
        "compiler_options": {},
    }
    assert by_name["baseline_xla"]["options"] == {"compiler_options": {}}
    assert by_name["auto_xla_options"]["options"] == {"compiler_options": {}}
    assert by_name["auto+layer_norm"]["kernels"]["layer_norm"] == "pallas"
    assert (tmp_path / "ablation_tiny_float32_t.md").read_text().startswith("# Ablation: tiny")


def test_rates_warmup_and_the_prepared_conditioning_recorded(tmp_path):
    """--rates measures the machine beside the rows; --warmup runs the first row once,
    unrecorded; `auto` keeps its prepared conditioning (counted in the peak), and
    `auto_unprepared` keeps none."""
    proc = run_ablation(
        tmp_path, "--rows=auto,auto_unprepared", "--rates", "--rates_matmul_size=128",
        "--rates_copy_mib=1", "--warmup", "--noreference", "--end_to_end_repeats=0", "--tag=_r",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "ablation_tiny_float32_r.json").read_text())
    assert record["rates"]["matmul_size"] == 128 and record["rates"]["matmul_tflops"] > 0
    assert record["warmup_row"] == "auto"
    auto, unprepared = record["rows"]
    assert [auto["row"], unprepared["row"]] == ["auto", "auto_unprepared"]
    assert unprepared["options"]["prepare_weights"] is False
    assert auto["memory"]["prepared_gib"] > 0 == unprepared["memory"]["prepared_gib"]
    md = (tmp_path / "ablation_tiny_float32_r.md").read_text()
    assert "machine: matmul" in md and "warm-up: one unrecorded run of auto" in md


def test_interleaved_rows(tmp_path):
    """--interleave: every row compiles first, then the rows' timed images alternate; the
    rows come out as in block mode (same images, every figure there)."""
    proc = run_ablation(
        tmp_path, "--rows=auto,auto_unprepared", "--interleave", "--repeats=2",
        "--end_to_end_repeats=1", "--tag=_i",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "ablation_tiny_float32_i.json").read_text())
    assert record["interleaved"] is True
    assert [r["row"] for r in record["rows"]] == ["auto", "auto_unprepared"]
    for r in record["rows"]:
        assert "error" not in r and r["finite"] and r["latent_rel_error"] < 1e-3, r
        assert r["unet_step_ms"] > 0 and r["end_to_end_unsync_ms"] > 0
        assert r["end_to_end_same_image"] and r["one_program_image_max_diff"] <= 1
        assert r["one_program_compile_s"] > 0
    assert "interleaved: the rows' timed images" in (tmp_path / "ablation_tiny_float32_i.md").read_text()


def test_an_interleaved_row_that_fails_leaves_the_others_measured(tmp_path):
    """--interleave with a row whose compile fails (an XLA option that does not exist): that
    row is a recorded failure, the others are measured as usual, and the run exits nonzero."""
    proc = run_ablation(
        tmp_path, "--rows=auto", "--xla_row=bad:xla_no_such_option_here=true", "--interleave",
        "--end_to_end_repeats=0", "--noreference", "--tag=_f",
    )  # fmt: skip
    assert proc.returncode != 0
    record = json.loads((tmp_path / "ablation_tiny_float32_f.json").read_text())
    auto, bad = record["rows"]
    assert auto["row"] == "auto" and "error" not in auto and auto["finite"]
    assert auto["unet_step_ms"] > 0
    assert bad["row"] == "auto+bad" and "xla_no_such_option_here" in bad["error"]
    assert [f.split(":")[0] for f in record["failures"]] == ["auto+bad"]


def test_unknown_row_is_refused(tmp_path):
    proc = run_ablation(tmp_path, "--rows=baseline_xla,fastest")
    assert proc.returncode != 0
    assert "unknown rows ['fastest']" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_xla_row_specs():
    """--xla_row NAME:OPT=VAL,... (the ablation adds `auto` compiled with the pipeline's
    default XLA options plus these); a malformed one is refused. (experiments.common, not
    experiments.ablation: importing a script here would define its absl flags in-process.)"""
    import pytest

    from experiments import common

    assert common.parse_xla_row("x:a=true,c=2.5") == ("x", {"a": True, "c": 2.5})
    assert common.parse_xla_row(" y : d=on") == ("y", {"d": "on"})
    # a list value keeps its commas; a comma before OPTION= starts the next option
    assert common.parse_xla_row("cb:xla_gpu_enable_command_buffer=FUSION,CUBLAS,WHILE,b=1") == (
        "cb", {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,WHILE", "b": 1})  # fmt: skip
    for bad in ("x", "x:", ":a=1", "x:a"):
        with pytest.raises(ValueError, match="xla_row"):
            common.parse_xla_row(bad)


def test_xla_row_runs_auto_with_the_options_on_top(tmp_path):
    """On CPU the pipeline's defaults are {}: the row's options are exactly the given ones,
    and the row runs (a DebugOptions field valid on CPU)."""
    proc = run_ablation(
        tmp_path, "--rows=auto+cpu_opt", "--xla_row=cpu_opt:xla_gpu_enable_triton_gemm=false",
        "--tag=_x", "--noreference",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "ablation_tiny_float32_x.json").read_text())
    [row] = record["rows"]
    assert row["row"] == "auto+cpu_opt" and "error" not in row and row["finite"]
    assert row["options"] == {"compiler_options": {"xla_gpu_enable_triton_gemm": False}}
    assert row["kernels"]["geglu"] == "auto"


def test_flagged_rows_run_whether_rows_names_them_or_not():
    """`select_rows` (in a subprocess: the script defines absl flags on import)."""
    code = """
import json
from absl import app
from experiments import ablation
picked = ablation.select_rows(["auto"], ["nomerge:xla_gpu_dot_merger_threshold_mb=0"],
                              ["eager:lazy_sum=false"])
out = {"picked": list(picked),
       "merge": picked["auto+nomerge"][1]["compiler_options"]["xla_gpu_dot_merger_threshold_mb"],
       "only": list(ablation.select_rows(["auto+nomerge"], ["nomerge:a=1"], [])),
       "all": "baseline_xla" in ablation.select_rows(None, [], [])}
try:
    ablation.select_rows(["fastest"], [], [])
except app.UsageError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""
    got = last_json_line(run_python(code))
    assert got["picked"] == ["auto", "auto+nomerge", "auto+eager"] and got["merge"] == 0
    assert got["only"] == ["auto+nomerge"] and got["all"]
    assert got["error"].startswith("unknown rows ['fastest']")


def test_malformed_xla_row_is_refused_before_any_work(tmp_path):
    proc = run_ablation(tmp_path, "--xla_row=nooptions")
    assert proc.returncode != 0
    assert "--xla_row wants NAME:OPTION=VALUE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hopper_row_runs_with_the_overrides_recorded(tmp_path):
    """--hopper_row NAME:FIELD=VALUE adds `auto` run under the Hopper attention's
    config_overrides (on the CPU no Hopper kernel runs: the row runs as `auto` does) and
    records the fields; the row's StableDiffusion options stay the pipeline's."""
    proc = run_ablation(
        tmp_path, "--rows=auto+eager_sum", "--hopper_row=eager_sum:lazy_sum=false,stages=2",
        "--tag=_h", "--noreference", "--end_to_end_repeats=0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "ablation_tiny_float32_h.json").read_text())
    [row] = record["rows"]
    assert row["row"] == "auto+eager_sum" and "error" not in row and row["finite"]
    assert row["hopper_overrides"] == {"lazy_sum": False, "stages": 2}
    assert row["options"] == {"compiler_options": {}}


@pytest.mark.parametrize(
    "spec, message",
    [("x:no_such_field=1", "unknown HopperConfig fields ['no_such_field']"),
     ("nofields", "want NAME:FIELD=VALUE"), ("x:lazy_sum", "want NAME:FIELD=VALUE")],
)  # fmt: skip
def test_malformed_hopper_row_is_refused_before_any_work(tmp_path, spec, message):
    proc = run_ablation(tmp_path, f"--hopper_row={spec}")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
