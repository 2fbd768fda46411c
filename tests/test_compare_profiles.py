"""experiments/compare_profiles.py: two profile records side by side, per kernel family."""

import pytest

from experiments import compare_profiles as cp


def _profile(kind: str, kernels: list[tuple[str, str, float, float]], copy_gbps: float) -> dict:
    return {
        "device": {"device_kind": kind, "jax": "0"},
        "rates": {"copy_gbps": copy_gbps, "matmul_tflops": 780.0},
        "programs": {"denoise_loop": {"steps_per_call": 4, "kernels": [
            {"kernel": n, "kind": k, "ms": ms, "per_call": launches}
            for n, k, ms, launches in kernels]}},
    }  # fmt: skip


A = _profile("GPU A", [
    ("nvjet_sm90_hsh_96x128_64x6_2x1_v_bz_NNN", "matmul", 0.25, 14.0),
    ("nvjet_sm90_hsh_128x128_64x6_1x2_h_bz_NNT", "matmul", 0.5, 20.0),
    ("nvjet_sm90_hsh_128x128_64x6_2x4_h_bz_NNT", "attention", 0.125, 5.0),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_tilesize128x192x64", "conv", 0.375, 8.0),
    ("sdjax_group_norm_stats_", "norm", 0.2, 30.0),
    ("only_in_a", "copy", 0.05, 2.0),
], 2863.0)  # fmt: skip
B = _profile("GPU B", [
    ("nvjet_sm90_hsh_96x128_64x6_2x1_v_bz_NNN", "matmul", 0.25, 14.0),
    ("nvjet_sm90_hsh_192x64_64x6_1x2_h_bz_NNT", "matmul", 0.25, 20.0),
    ("nvjet_sm90_hsh_128x128_64x6_2x4_h_bz_NNT", "attention", 0.125, 5.0),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_tilesize64x128x64", "conv", 0.3, 8.0),
    ("sdjax_group_norm_stats_", "norm", 0.15, 30.0),
], 3771.0)  # fmt: skip


def test_families_group_cublas_by_kind_and_cudnn_as_one():
    fam = cp.families(A, "denoise_loop")
    assert fam["cuBLAS nvjet (matmul)"] == {"ms": 0.75, "launches": 34.0}
    assert fam["cuBLAS nvjet (attention)"]["ms"] == 0.125
    assert fam["cuDNN convolutions"]["ms"] == 0.375
    assert fam["sdjax_group_norm_stats_"]["launches"] == 30.0


def test_compare_rows_totals_and_changes():
    record = cp.compare(A, B)
    rows = {r["family"]: r for r in record["rows"]}
    # the largest family in either run comes first
    assert record["rows"][0]["family"] == "cuBLAS nvjet (matmul)"
    assert rows["cuBLAS nvjet (matmul)"]["change_pct"] == pytest.approx(-100.0 / 3)
    assert rows["sdjax_group_norm_stats_"]["change_pct"] == pytest.approx(-25.0)
    # a family one run lacks has no change, and its missing side is None, not zero
    assert rows["only_in_a"]["b_us"] is None and rows["only_in_a"]["change_pct"] is None
    assert record["total_a_ms"] == pytest.approx(1.5)
    assert record["total_b_ms"] == pytest.approx(1.075)
    assert record["total_change_pct"] == pytest.approx(100 * (1.075 - 1.5) / 1.5)
    assert record["a"]["rates"]["copy_gbps"] == 2863.0 and record["b"]["steps_per_call"] == 4
    assert len(cp.compare(A, B, top=2)["rows"]) == 2


def test_markdown_names_both_runs_and_their_rates():
    md = cp.markdown(cp.compare(A, B), "A run", "B run")
    assert "copy 2863 GB/s" in md and "copy 3771 GB/s" in md
    assert "| cuDNN convolutions | 375 | 300 | -20 | 8 |" in md
    assert "**all kernels**" in md


def test_a_program_the_profile_lacks_is_a_clear_error():
    with pytest.raises(ValueError, match="no program 'vae_decode'.*denoise_loop"):
        cp.compare(A, B, program="vae_decode")
