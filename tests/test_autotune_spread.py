"""experiments.autotune_spread's reading of XLA's autotune results (CPU: a written file; the
GPU run that dumps real ones is the experiment itself, results README item 211)."""

from experiments import autotune_spread as ats

CONV = r'(f16[2,32,32,640]{3,2,1,0}, u8[0]{0}) custom-call(f16[2,32,32,640]{3,2,1,0} %p, f16[3,3,640,640]{3,2,1,0} %k), window={size=3x3 pad=1_1x1_1}, custom_call_target=\"__cudnn$convBiasActivationForward\", backend_config={\"a\":{}}'
GEMM = r'(f16[512,1280]{1,0}, s8[4194304]{0}) custom-call(f16[512,1280]{1,0} %x, f16[1280,1280]{1,0} %w), custom_call_target=\"__cublas$lt$matmul\"'


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
    assert summary.startswith("(f16[2,32,32,640]") and "__cudnn$convBiasActivationForward" in summary


def test_instructions_missing_from_a_trial_are_not_compared():
    full = ats.autotune_picks(_dump(12, 5))
    only_gemm = {k: v for k, v in ats.autotune_picks(_dump(7, 6)).items() if "matmul" in k}
    assert len(ats.differing_picks([full, only_gemm])) == 1  # the GEMM, which both have
