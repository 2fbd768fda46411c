"""experiments/ncu_source_report.py: Nsight Compute's source page, summed by instruction and
opcode (CPU; the script defines absl flags, so it runs in a fresh process)."""

from __future__ import annotations

import json

from tests._subprocess import run_script

CSV = """\
"Kernel Name","sdjax_flash_hopper_mosaic_gpu_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"
"0x7f00","HGMMA.64x128x16.F32 R24, gdesc[UR4], RZ, !UPT ;","1,200","1,000","4096"
"0x7f10","@!P0 SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R3 ;","3,000","2,900","8192"
"0x7f20","MUFU.EX2 R5, R4 ;","600","100","65536"
"0x7f30","MUFU.EX2 R6, R7 ;","200","50","65536"
"""  # noqa: E501


def test_summarize_ranks_instructions_and_opcodes(tmp_path):
    path = tmp_path / "ncu_source_attention_64.csv"
    path.write_text(CSV)
    out = tmp_path / "out"
    run_script("ncu_source_report", f"--csv={path}", "--top=3", out_dir=out)
    s = json.loads((out / "ncu_source_attention_64.json").read_text())
    assert s["samples_total"] == 5000 and s["instructions_total"] == 4
    assert [i["opcode"] for i in s["top"]] == ["SYNCS", "HGMMA", "MUFU"]
    assert s["top"][0]["pct"] == 60.0 and s["top"][0]["not_issued"] == 2900
    assert {o["opcode"]: o["samples"] for o in s["by_opcode"]} == {"SYNCS": 3000, "HGMMA": 1200,
                                                                   "MUFU": 800}  # fmt: skip
    assert "SYNCS" in (out / "ncu_source_attention_64.md").read_text()


def test_one_table_per_kernel(tmp_path):
    two = CSV + CSV.replace("sdjax_flash_hopper_mosaic_gpu_kernel", "sdjax_group_norm_stats")
    path = tmp_path / "ncu_source_gn.csv"
    path.write_text(two)
    out = tmp_path / "out"
    run_script("ncu_source_report", f"--csv={path}", out_dir=out)
    first = json.loads((out / "ncu_source_gn_0.json").read_text())
    second = json.loads((out / "ncu_source_gn_1.json").read_text())
    assert first["kernel"] == "sdjax_flash_hopper_mosaic_gpu_kernel"
    assert second["kernel"] == "sdjax_group_norm_stats"
    assert first["samples_total"] == second["samples_total"] == 5000
