"""What ptxas made of our Mosaic GPU kernels: registers, spills, its warnings, SASS op counts.

    PYTHONPATH=. python experiments/ptxas_report.py --dump_dirs=DIR[,DIR...] [--out_name=NAME]

Each DIR holds what one run of a kernel left with Mosaic GPU's dump switches set
(`MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO=DIR`; the run's console
output may sit beside them as a file too). `experiments/gpu_session.sh ptxas` runs
`experiments/ncu_probe.py` once per op that way, then this script over the directories.

Why: Nsight Compute puts the Hopper attention and GEGLU kernels at 35-40% of their tensor and
issue throughput with one CTA per SM (`experiments/results/README.md`, s8 and s11), and a
wgmma that ptxas serializes, or registers spilled to local memory, would look like that. ptxas
says both in its verbose output ("Potential Performance Loss: wgmma.mma_async instructions are
serialized ..."; "N bytes spill stores"); the SASS says how many instructions of each kind the
kernel issues (exponentials, `HGMMA`s, barrier waits).

Writes ptxas_report_<device>_<date>[_<out_name>].json and .md to results_dir().
"""

from __future__ import annotations

import collections
import datetime
import pathlib
import re

from absl import app, flags

from experiments import common

_DIRS = flags.DEFINE_list("dump_dirs", [], "one dump directory per op (the op is its name)")
_OUT_NAME = flags.DEFINE_string("out_name", "", "extra tag for the output file names")

# ptxas -v lines (CUDA 12/13 wording).
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_WARNING = re.compile(r"ptxas (?:warning|info)\s*:\s*(.*(?:Performance|serializ|warning).*)",
                      re.IGNORECASE)  # fmt: skip
# A SASS instruction line: /*0a40*/  [@P0 ]OPCODE.MODIFIERS operands ;
_SASS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_x]+)*)")
# Opcodes worth a column: the tensor cores, the exponentials, conversions, barriers, memory.
KEY_OPS = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP", "SHFL", "SYNCS", "BAR",
           "WARPGROUP", "LDS", "STS", "LDG", "STG", "LDL", "STL", "UTMALDG", "UTMASTG", "BRA")  # fmt: skip


def parse_ptxas(text: str) -> dict:
    """The verbose ptxas output of one compile -> {entry: {registers, spill_*, warnings}}."""
    entries: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = entries.setdefault(m.group(1), {"warnings": []})
            continue
        if current is None:
            if "ptxas" in line and _WARNING.search(line):  # a warning before any entry line
                current = entries.setdefault("?", {"warnings": []})
            else:
                continue
        if m := _REGISTERS.search(line):
            current["registers"] = int(m.group(1))
        if m := _SPILLS.search(line):
            current["spill_store_bytes"], current["spill_load_bytes"] = map(int, m.groups())
        if m := _STACK.search(line):
            current["stack_bytes"] = int(m.group(1))
        if (m := _WARNING.search(line)) and "Used" not in line and "Compiling" not in line:
            current["warnings"].append(m.group(1).strip())
    return entries


def count_sass(text: str) -> dict:
    """Static SASS op counts: {'opcodes': {OPCODE: n}, 'detail': {OPCODE.MODS: n}}."""
    base, detail = collections.Counter(), collections.Counter()
    for m in _SASS.finditer(text):
        base[m.group(1)] += 1
        detail[m.group(1) + m.group(2)] += 1
    return {"opcodes": dict(base), "detail": dict(detail.most_common(40)), "total": sum(base.values())}


def read_dump(directory: pathlib.Path) -> dict:
    """Every text file of one dump directory, sorted into ptxas logs and SASS listings."""
    ptxas: dict[str, dict] = {}
    sass = collections.Counter()
    detail = collections.Counter()
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        files.append(path.name)
        if "ptxas" in text:
            for entry, info in parse_ptxas(text).items():
                ptxas.setdefault(entry, info)
        if _SASS.search(text) and (".sass" in path.name or "HGMMA" in text or "EXIT" in text):
            counted = count_sass(text)
            sass.update(counted["opcodes"])
            detail.update(counted["detail"])
    return {"files": files, "ptxas": ptxas, "sass_opcodes": dict(sass),
            "sass_detail": dict(detail.most_common(40))}  # fmt: skip


def _markdown(rows: dict) -> str:
    lines = ["# ptxas and SASS of our Mosaic GPU kernels", ""]
    lines += ["| op | kernel | registers | spill stores / loads (bytes) | ptxas warnings |",
              "|---|---|---|---|---|"]  # fmt: skip
    for op, row in rows.items():
        if not row["ptxas"]:
            lines.append(f"| {op} | (no ptxas output found) | | | |")
        for entry, info in row["ptxas"].items():
            spills = f"{info.get('spill_store_bytes', '?')} / {info.get('spill_load_bytes', '?')}"
            warnings = "; ".join(info["warnings"]) or "none"
            lines.append(f"| {op} | {entry[:40]} | {info.get('registers', '?')} | {spills} | "
                         f"{warnings} |")  # fmt: skip
    if not any(row["sass_opcodes"] for row in rows.values()):
        lines += ["", "No SASS in the dumps (Mosaic GPU writes it only where it finds nvdisasm)."]
        return "\n".join(lines) + "\n"
    lines += ["", "Static SASS instruction counts (the whole kernel, loops counted once):", ""]
    lines += ["| op | " + " | ".join(KEY_OPS) + " | all |", "|---" * (len(KEY_OPS) + 2) + "|"]
    for op, row in rows.items():
        ops = row["sass_opcodes"]
        cells = [str(ops.get(k, 0)) for k in KEY_OPS]
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {sum(ops.values())} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    rows = {}
    for d in _DIRS.value:
        path = pathlib.Path(d)
        if not path.is_dir():
            raise SystemExit(f"no dump directory {path}")
        rows[path.name] = read_dump(path)
        r = rows[path.name]
        print(f"{path.name}: {len(r['files'])} files; ptxas {r['ptxas']}; "
              f"HGMMA {r['sass_opcodes'].get('HGMMA', 0)} MUFU {r['sass_opcodes'].get('MUFU', 0)}")  # fmt: skip
    info = common.device_info()
    device = info["device_kind"].replace(" ", "_")
    tag = f"_{_OUT_NAME.value}" if _OUT_NAME.value else ""
    stem = f"ptxas_report_{device}_{datetime.date.today()}{tag}"
    header = f"device: {info['device_kind']}, jax {info['jax']}\n\n"
    out = common.write_record(stem, {"device": info, "ops": rows}, header + _markdown(rows))
    print(f"wrote {out / stem}.json/.md")


if __name__ == "__main__":
    app.run(main)
