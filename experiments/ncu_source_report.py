"""Which SASS instructions a kernel's warps stall on: Nsight Compute's source page, summed.

    PYTHONPATH=. python experiments/ncu_source_report.py --csv=ncu_source_attention_64.csv

The CSV is `ncu -i REPORT --page source --csv --print-source sass` of a report taken with the
SourceCounters section (`experiments/gpu_session.sh ncu_source`): one row per SASS instruction
with its warp stall samples. A warp is sampled at fixed intervals; the samples on an instruction
count the warps waiting to issue it (the wait is for whatever that instruction needs: a
barrier's phase, a load's data, a free pipe). This script finds the columns by their names
(ncu versions word them alike but order them differently), ranks the instructions by samples,
and sums the samples by opcode.

Why: Nsight Compute's summary puts the Hopper attention and GEGLU at 35-40% of their tensor
and issue throughput, with the L1TEX scoreboard (barrier polls, shared-memory loads) as the top
stall (`experiments/results/README.md`, s8 and s11), which does not say which wait it is.

Writes ncu_source_<name>.json and .md (name: the CSV's, less its suffix; with _<i> per launch
where the CSV holds several, e.g. a GroupNorm's statistics and normalize kernels) to
results_dir().
"""

from __future__ import annotations

import collections
import csv
import io
import pathlib
import re

from absl import app, flags

from experiments import common

_CSV = flags.DEFINE_string("csv", None, "ncu --page source --csv output")
_TOP = flags.DEFINE_integer("top", 40, "instructions to list")

_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")


def _number(text: str) -> float | None:
    text = (text or "").strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def read_source_csv(text: str) -> tuple[list[str], list[dict]]:
    """The header and rows of the first CSV table in `text` that has a source column and a
    sampling column (ncu may print a kernel line or warnings before it)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Source" in line and "Sampl" in line:
            reader = csv.DictReader(io.StringIO("\n".join(lines[i:])))
            rows = [r for r in reader if r]
            return list(reader.fieldnames or []), rows
    raise ValueError("no table with a Source column and a Warp Stall Sampling column")


def opcode(source: str) -> str:
    """`@!P0 HGMMA.64x128x16.F32 R24, ...` -> `HGMMA`."""
    source = _PREDICATE.sub("", (source or "").strip())
    return re.split(r"[\s.]", source, maxsplit=1)[0] if source else ""


def summarize(header: list[str], rows: list[dict], top: int = 40) -> dict:
    source_col = next(c for c in header if c.strip() == "Source" or "Source" in c)
    address_col = next((c for c in header if "Address" in c), None)
    all_col = next(c for c in header if "Sampl" in c and "Not" not in c)
    not_issued_col = next((c for c in header if "Sampl" in c and "Not" in c), None)
    executed_col = next((c for c in header if c.strip() == "Instructions Executed"), None)
    total = sum(_number(r.get(all_col)) or 0 for r in rows)
    instructions = []
    by_opcode = collections.Counter()
    for r in rows:
        samples = _number(r.get(all_col)) or 0
        op = opcode(r.get(source_col, ""))
        by_opcode[op] += samples
        instructions.append({
            "address": (r.get(address_col) or "").strip() if address_col else "",
            "source": (r.get(source_col) or "").strip()[:120],
            "opcode": op,
            "samples": samples,
            "pct": 100 * samples / total if total else 0.0,
            "not_issued": _number(r.get(not_issued_col)) if not_issued_col else None,
            "executed": _number(r.get(executed_col)) if executed_col else None,
        })  # fmt: skip
    instructions.sort(key=lambda i: -i["samples"])
    opcodes = [{"opcode": k, "samples": v, "pct": 100 * v / total if total else 0.0}
               for k, v in by_opcode.most_common()]  # fmt: skip
    return {"columns": header, "instructions_total": len(rows), "samples_total": total,
            "sampling_column": all_col, "top": instructions[:top], "by_opcode": opcodes}  # fmt: skip


def _markdown(name: str, s: dict) -> str:
    lines = [f"# Warp stall samples by SASS instruction: {name}", "",
             f"{s['instructions_total']} instructions, {s['samples_total']:.0f} samples "
             f"(column `{s['sampling_column']}`).", "", "By opcode:", "",
             "| opcode | samples | % |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {o['opcode']} | {o['samples']:.0f} | {o['pct']:.1f} |" for o in s["by_opcode"][:25]]
    lines += ["", "Top instructions:", "", "| address | instruction | samples | % | not issued |",
              "|---|---|---|---|---|"]  # fmt: skip
    for i in s["top"]:
        src = i["source"].replace("|", "/")
        lines.append(f"| {i['address']} | `{src}` | {i['samples']:.0f} | {i['pct']:.1f} | "
                     f"{i['not_issued'] if i['not_issued'] is not None else ''} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def kernel_blocks(text: str) -> list[tuple[str, str]]:
    """[(kernel name, its part of the CSV)]: ncu writes one table per profiled launch, each
    after a `"Kernel Name","..."` line (text without such lines is one unnamed block)."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith('"Kernel Name"'):
            name = next(csv.reader([line]))[1]
            blocks.append((name, []))
        elif blocks:
            blocks[-1][1].append(line)
    if not blocks:
        return [("", text)]
    return [(name, "\n".join(lines)) for name, lines in blocks]


def main(argv):
    del argv
    path = pathlib.Path(_CSV.value)
    blocks = kernel_blocks(path.read_text(errors="replace"))
    for i, (kernel, text) in enumerate(blocks):
        stem = path.stem if len(blocks) == 1 else f"{path.stem}_{i}"
        header, rows = read_source_csv(text)
        summary = {"kernel": kernel, **summarize(header, rows, _TOP.value)}
        common.write_record(stem, summary, _markdown(f"{stem} ({kernel})", summary))


if __name__ == "__main__":
    flags.mark_flag_as_required("csv")
    app.run(main)
