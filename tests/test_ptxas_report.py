"""experiments/ptxas_report.py: reading ptxas's verbose output and SASS listings (CPU).

The real dumps come from Mosaic GPU compiles on the device (`gpu_session.sh ptxas`); here the
parser reads text written like ptxas's and cuobjdump's, and the script runs end to end on a
directory of such files, in a fresh process (it defines absl flags)."""

from __future__ import annotations

import json

from tests._subprocess import last_json_line, run_python, run_script

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'sdjax_flash_hopper_kernel' for 'sm_90a'
ptxas info    : Function properties for sdjax_flash_hopper_kernel
    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas warning : Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline in the function 'sdjax_flash_hopper_kernel'
ptxas info    : Used 168 registers, used 1 barriers, 512 bytes cmem[0]
"""  # noqa: E501

SASS = """\
        Function : sdjax_flash_hopper_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], RZ, !UPT ;
        /*0020*/                   HGMMA.64x128x16.F32 R24, gdesc[UR8], R24 ;
        /*0030*/              @!P0 MUFU.EX2 R5, R4 ;
        /*0040*/                   MUFU.EX2 R6, R7 ;
        /*0050*/                   FFMA R8, R9, R10, -R11 ;
        /*0060*/                   EXIT ;
"""


def test_parse_ptxas_and_count_sass():
    code = f"""
import json, sys
from experiments import ptxas_report as r
ptxas = r.parse_ptxas({PTXAS_LOG!r})
sass = r.count_sass({SASS!r})
print(json.dumps({{"ptxas": ptxas, "sass": sass}}))
"""
    got = last_json_line(run_python(code))
    entry = got["ptxas"]["sdjax_flash_hopper_kernel"]
    assert entry["registers"] == 168
    assert (entry["spill_store_bytes"], entry["spill_load_bytes"], entry["stack_bytes"]) == (16, 12, 24)
    assert len(entry["warnings"]) == 1 and "serialized" in entry["warnings"][0]
    ops = got["sass"]["opcodes"]
    assert (ops["HGMMA"], ops["MUFU"], ops["FFMA"], ops["EXIT"]) == (2, 2, 1, 1)
    assert got["sass"]["detail"]["MUFU.EX2"] == 2
    assert got["sass"]["total"] == 7


def test_script_writes_a_report(tmp_path):
    dump = tmp_path / "attention_64"
    dump.mkdir()
    (dump / "stdout.txt").write_text(PTXAS_LOG)
    (dump / "sdjax_flash_hopper.sass").write_text(SASS)
    out = tmp_path / "out"
    run_script("ptxas_report", f"--dump_dirs={dump}", "--out_name=t", out_dir=out)
    (report,) = out.glob("ptxas_report_*_t.json")
    row = json.loads(report.read_text())["ops"]["attention_64"]
    assert row["ptxas"]["sdjax_flash_hopper_kernel"]["registers"] == 168
    assert row["sass_opcodes"]["HGMMA"] == 2
    assert "serialized" in (out / report.name.replace(".json", ".md")).read_text()
