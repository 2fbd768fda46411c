"""Every kernel benchmark in one command (GPU), then the `auto` table from their results.

    python -m experiments.kernel_bench --dtype float16 [--update_autotune]

Runs `experiments/bench_attention.py` (flash, fused softmax, cuDNN, XLA, torch SDPA at every
SD attention shape) and `experiments/bench_norm.py` (GroupNorm(+SiLU) and GEGLU vs XLA and
torch, with the copy bandwidth), each in its own process so that each owns its flags, and
then `experiments/make_autotune.py` on the JSON they wrote. Every benchmark checks its
kernels' outputs against the reference in the same run.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "input dtype")
flags.DEFINE_list("ops", ["attention", "norm"], "which benchmarks to run")
flags.DEFINE_bool("update_autotune", False, "write sdjax/assets/autotune.json (else results_dir())")

_SCRIPTS = {
    "attention": ["experiments/bench_attention.py"],
    "norm": ["experiments/bench_norm.py"],
}


def main(argv):
    from experiments import common

    del argv
    out = common.results_dir()
    before = set(out.glob("bench_*.json"))
    root = pathlib.Path(__file__).resolve().parents[1]
    failed = []
    for op in FLAGS.ops:
        if op not in _SCRIPTS:
            raise app.UsageError(f"unknown op {op!r}; choose from {sorted(_SCRIPTS)}")
        cmd = [sys.executable, *_SCRIPTS[op], f"--dtype={FLAGS.dtype}"]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=root).returncode:
            failed.append(op)
    new = sorted(set(out.glob("bench_*.json")) - before)
    attention = [str(p) for p in new if p.name.startswith("bench_attention")]
    norm = [str(p) for p in new if p.name.startswith("bench_norm")]
    if attention or norm:
        table = (
            root / "sdjax/assets/autotune.json" if FLAGS.update_autotune else out / "autotune.json"
        )
        subprocess.run(
            [sys.executable, "-m", "experiments.make_autotune", f"--attention={','.join(attention)}",
             f"--norm={','.join(norm)}", f"--out={table}"],
            cwd=root,
            check=True,
        )  # fmt: skip
    if failed:
        print(f"error: benchmark(s) failed: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
