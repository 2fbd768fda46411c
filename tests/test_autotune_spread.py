"""experiments.autotune_spread's reading of XLA's autotune results (CPU: a written file; the
GPU run that dumps real ones is the experiment itself, results README item 211)."""

import pytest

from experiments import autotune_spread as ats

CONV = r"(f16[2,32,32,640]{3,2,1,0}, u8[0]{0}) custom-call(f16[2,32,32,640]{3,2,1,0} %p, f16[3,3,640,640]{3,2,1,0} %k), window={size=3x3 pad=1_1x1_1}, custom_call_target=\"__cudnn$convBiasActivationForward\", backend_config={\"a\":{}}"
GEMM = r"(f16[512,1280]{1,0}, s8[4194304]{0}) custom-call(f16[512,1280]{1,0} %x, f16[1280,1280]{1,0} %w), custom_call_target=\"__cublas$lt$matmul\""


def _dump(conv_algo: int, gemm_algo: int, conv_ns: int = 30000) -> str:
    return f"""version: 3
results {{
  device: "CUDA: 9.0, Cores: 132, GPU clock: 1.98 GHz"
  hlo: "{CONV}"
  result {{
    scratch_bytes: 131
    run_time {{
      nanos: {conv_ns}
    }}
    algorithm {{
      algo_id: {conv_algo}
      math_type: TENSOR_OP_MATH
      tuning_knobs {{ key: 2 value: 1 }}
      is_cudnn_frontend: true
    }}
  }}
}}
results {{
  device: "CUDA: 9.0, Cores: 132, GPU clock: 1.98 GHz"
  hlo: "{GEMM}"
  result {{
    run_time {{
      nanos: 12000
    }}
    gemm {{
      algorithm: {gemm_algo}
    }}
  }}
}}
"""


def test_picks_read_per_instruction_without_run_times():
    picks = ats.autotune_picks(_dump(12, 5))
    assert len(picks) == 2
    conv = next(v for k, v in picks.items() if "convBiasActivation" in k)
    assert "algo_id: 12" in conv and "nanos" not in conv and "tuning_knobs" in conv
    gemm = next(v for k, v in picks.items() if "lt$matmul" in k)
    assert gemm.replace(" ", "") == "gemm{algorithm:5}"


def test_same_picks_with_other_run_times_do_not_differ():
    a, b = ats.autotune_picks(_dump(12, 5, 30000)), ats.autotune_picks(_dump(12, 5, 41000))
    assert a == b
    assert ats.differing_picks([a, b]) == []


def test_differing_picks_name_the_instruction():
    trials = [ats.autotune_picks(_dump(12, 5)), ats.autotune_picks(_dump(7, 5)),
              ats.autotune_picks(_dump(12, 5))]  # fmt: skip
    diff = ats.differing_picks(trials)
    assert len(diff) == 1 and "convBiasActivation" in diff[0]
    summary = ats.hlo_summary(diff[0])
    assert (
        summary.startswith("(f16[2,32,32,640]") and "__cudnn$convBiasActivationForward" in summary
    )


def test_instructions_missing_from_a_trial_are_not_compared():
    full = ats.autotune_picks(_dump(12, 5))
    only_gemm = {k: v for k, v in ats.autotune_picks(_dump(7, 6)).items() if "matmul" in k}
    assert len(ats.differing_picks([full, only_gemm])) == 1  # the GEMM, which both have


def _entries(algo_ids: list[int]) -> str:
    """jax 0.11's XLA format: one entry per instruction, known by its fingerprint."""
    out = ["version: 4"]
    for i, algo in enumerate(algo_ids):
        out.append(f"""entries {{
  key {{
    target {{
      device: "699b92c0fb30cb16"
      hlo_fingerprint: "fp{i}"
    }}
    environment {{ codegen_version: "fe90" }}
  }}
  value {{
    optimal_config {{
      backend: CUDNN
      backend_config {{ algorithm {{ algo_id: {algo} tuning_knobs {{ key: 25 value: 1 }} }} }}
    }}
    optimal_backend_version: "9.19.0"
  }}
}}""")
    return "\n".join(out) + "\n"


def test_entries_format_read_by_fingerprint():
    a, b = ats.autotune_picks(_entries([39, 41])), ats.autotune_picks(_entries([39, 40]))
    assert len(a) == 2 and all("fingerprint fp" in k for k in a)
    assert ats.differing_picks([a, b]) == [next(k for k in a if k.endswith("fp1"))]
    assert ats._backend(a[next(iter(a))]) == "CUDNN"


def test_summarize_reads_a_finished_run(tmp_path, monkeypatch):
    import json

    device = {"device_kind": "test", "jax": "0"}
    for i, (algos, lat) in enumerate((([39, 41], 1.5), ([39, 40], 1.25))):
        rec = {"device": device, "unet_step_ms": 5.0 + i, "unet_step_ms_runs": [5.0 + i] * 3,
               "image_ms": 110.0, "image_back_to_back_ms": 109.0, "latents_sum": lat,
               "compile_s": 1.0}  # fmt: skip
        (tmp_path / f"s_trial{i}.json").write_text(json.dumps(rec))
        (tmp_path / f"s_trial{i}_autotune.txt").write_text(_entries(algos))
    pin = {"device": device, "unet_step_ms": 5.5, "image_ms": 110.0,
           "image_back_to_back_ms": 109.0, "latents_sum": 1.25, "compile_s": 0.5,
           "pinned_trial": 1, "label": "slowest", "command_buffers": ""}  # fmt: skip
    (tmp_path / "s_pin_slowest.json").write_text(json.dumps(pin))
    monkeypatch.setenv("OUT", str(tmp_path))  # where write_record puts <stem>.md
    record = ats.summarize(tmp_path, "s")
    assert record["step_spread_ms"] == 1.0
    assert record["autotuned"] == 2 and record["differing_by_backend"] == {"CUDNN": 1}
    assert record["rows"][-1]["same_latents_as_trial"] is True
    # the pinned process ran without command buffers; the trials' records predate the field
    assert record["rows"][-1]["command_buffers"] == "off"
    assert record["rows"][0]["command_buffers"] == "not recorded"
    assert (tmp_path / "s.md").read_text().count("| trial") == 2


@pytest.mark.gpu
def test_pinned_autotuning_gives_bit_identical_latents(tmp_path):
    """Two fresh processes, the second loading the first's autotune picks, make the same
    latents bit for bit (at SD1.5 scale in s21a: fresh processes differ in the fifth digit,
    pinned ones do not; here the tiny config, fp16). The loading process runs with command
    buffers off, as `autotune_spread` pins by default: with them on, it failed on the H200
    (item 269 of `experiments/results/README.md`)."""
    import json
    import subprocess
    import sys

    dump = tmp_path / "picks.txt"
    records = []
    for i, option in enumerate((f"--dump={dump}", f"--load={dump}")):
        out = tmp_path / f"run{i}.json"
        subprocess.run([sys.executable, "-m", "experiments.autotune_spread", f"--child_out={out}",
                        "--config=tiny", "--dtype=float16", "--steps=3", "--repeats=1",
                        option], check=True)  # fmt: skip
        records.append(json.loads(out.read_text()))
        if i == 0:
            assert dump.exists() and ats.autotune_picks(dump.read_text())
    assert records[0]["latents_sha256"] == records[1]["latents_sha256"]
    assert records[0]["command_buffers"] and records[1]["command_buffers"] == ""
