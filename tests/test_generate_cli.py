"""`python -m experiments.generate` as a user runs it: in a subprocess, checking exit codes.

Bad input must print one `error: ...` line (or absl's flag-parsing message) and exit non-zero
without a traceback. A good run writes the PNGs and a JSON record of the flags, the device,
the jax version, and compile and run time per component.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
LONG_PROMPT = "a photograph of an astronaut riding a horse on the moon " * 10  # ~110 tokens


def run_cli(*args: str, env: dict | None = None, timeout: int = 300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SDJAX_DISTRIBUTED": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "experiments.generate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def empty_prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "empty.txt"
    path.write_text("\n   \n\n")
    return path


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--height=100", "error: --height must be a positive multiple of 8; got 100"),
        ("--width=12", "error: --width must be a positive multiple of 8; got 12"),
        ("--steps=0", "error: --steps must be >= 1; got 0"),
        ("--guidance=-2", "error: --guidance must be >= 0 (<= 1 turns guidance off); got -2.0"),
        ("--batch=0", "error: --batch must be >= 1; got 0"),
        ("--kernels=fastest", "error: unknown kernel preset 'fastest'; choose from"),
        ("--attention=magic", "error: unknown attention implementation 'magic'"),
        ("--layer_norm=magic", "error: unknown layer_norm implementation 'magic'"),
        ("--xla_option=xla_gpu_enable_triton_gemm", "error: --xla_option wants NAME=VALUE"),
        ("--xla_option=xla_no_such_option=1", "error: bad compiler_options"),
        ("--prompts_file={empty}", "error: empty batch: the prompts file"),
        ("--prompts_file=/no/such/prompts.txt", "error: prompts file not found"),
        ("--checkpoint=/no/such/sd-model", "error: checkpoint folder not found: /no/such/sd-model"),
    ],
)
def test_bad_input_exits_with_a_clear_error(flag, message, empty_prompts_file):
    proc = run_cli("--config=tiny", "--steps=2", flag.format(empty=empty_prompts_file))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_scheduler_is_rejected_by_the_flag_parser():
    proc = run_cli("--config=tiny", "--scheduler=plms2")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    # absl's own message names the flag and lists the choices.
    assert "flag --scheduler=plms2: value should be one of <ddim|pndm|euler|euler_a" in proc.stderr


def test_stray_positional_argument():
    proc = run_cli("--config=tiny", "a cat")
    assert proc.returncode == 2
    assert "error: unexpected arguments ['a cat']" in proc.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from tests._pipeline_util import save_diffusers_checkpoint

    return save_diffusers_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sd")


def test_run_writes_pngs_and_json(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat\n\n{LONG_PROMPT}\n")
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = run_cli(
        f"--checkpoint={checkpoint}",
        f"--prompts_file={prompts}",
        "--batch=2",
        "--steps=2",
        "--scheduler=ddim",
        "--seed=3",
        "--layer_norm=pallas",
        "--nohoist_conditioning",
        "--noshare_guidance_prefix",
        "--xla_option=xla_gpu_enable_triton_gemm=false",
        f"--out={out}",
        env={"SDJAX_CACHE_DIR": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "longer than 77 tokens" in proc.stderr  # the truncation warning
    record = json.loads((out / "generate.json").read_text())

    assert record["flags"]["steps"] == 2 and record["flags"]["batch"] == 2
    assert record["flags"]["prompts_file"] == str(prompts)
    assert record["flags"]["layer_norm"] == "pallas"
    assert record["flags"]["hoist_conditioning"] is False
    assert record["flags"]["share_guidance_prefix"] is False
    assert record["kernels"]["layer_norm"] == "pallas"
    assert record["flags"]["xla_option"] == ["xla_gpu_enable_triton_gemm=false"]
    assert record["compiler_options"] == {"xla_gpu_enable_triton_gemm": False}
    assert "helpfull" not in record["flags"]  # absl's own flags are not recorded
    assert record["device"]["jax"] == jax.__version__
    assert record["device"]["backend"] == "cpu" and len(record["devices"]) == 1
    assert record["random_weights"] is False and record["scheduler"] == "ddim"
    for component in ("text_encoder", "denoise", "vae_decode"):
        times = record["timings"][component]
        assert times["compile_s"] > 0 and times["run_s"] > 0
    assert record["timings"]["denoise"]["steps"] == 2
    assert record["total_compile_s"] > 0 and record["load_s"] > 0
    # the whole call's wall covers the components' (their sum leaves out the host work)
    assert record["end_to_end_s"] >= record["total_run_s"] > 0
    parts = ("text_encoder", "denoise", "vae_decode")
    assert record["total_compile_s"] == pytest.approx(
        sum(record["timings"][c]["compile_s"] for c in parts)
    )

    # --batch=2 repeats each prompt: a cat, a cat, long, long.
    assert record["prompts"] == ["a cat", "a cat", LONG_PROMPT.strip(), LONG_PROMPT.strip()]
    assert [t["index"] for t in record["truncated_prompts"]] == [2, 3]
    assert all(t["num_dropped_tokens"] > 0 for t in record["truncated_prompts"])
    images = [np.asarray(Image.open(path)) for path in record["images"]]
    assert [pathlib.Path(p).name for p in record["images"]] == [f"image_{i}.png" for i in range(4)]
    assert all(im.shape == (16, 16, 3) and im.dtype == np.uint8 for im in images)
    assert not np.array_equal(images[0], images[1])  # same prompt, own noise per index
    # The persistent compilation cache is on by default (it stores programs that took > 1 s
    # to compile, so whether this run's tiny programs land in it depends on the machine).
    assert record["flags"]["compilation_cache"] is True and cache.is_dir()


def test_one_program_flag(checkpoint, tmp_path):
    """--one_program: the image as one compiled program, its timing one "image" entry, the
    same PNG as the components' (within a uint8 level)."""
    common = (f"--checkpoint={checkpoint}", "--prompt=a cat", "--steps=2", "--scheduler=ddim",
              "--seed=3", "--noprogress", "--nocompilation_cache")  # fmt: skip
    records = {}
    for mode in ("one_program", "noone_program"):
        out = tmp_path / mode
        proc = run_cli(*common, f"--{mode}", f"--out={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        records[mode] = json.loads((out / "generate.json").read_text())
    whole = records["one_program"]
    assert whole["flags"]["one_program"] is True
    assert set(whole["timings"]) == {"image", "end_to_end"}
    assert whole["timings"]["image"]["steps"] == 2 and whole["total_run_s"] > 0
    assert whole["end_to_end_s"] >= whole["total_run_s"]
    a, b = (np.asarray(Image.open(r["images"][0])).astype(int) for r in records.values())
    assert np.abs(a - b).max() <= 1
