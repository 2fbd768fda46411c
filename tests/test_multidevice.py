"""Batch generation sharded over several devices, and over several processes (issue 8).

The pytest process has already started jax with one CPU device, so each multi-device check
runs this file as a script in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (or 2 per process for the two-process
`jax.distributed` run), and reports back through an .npz and a .json file.

Tolerance, 1 device vs 4 (and 1 process vs 2): the images may differ by at most one uint8
level and the final latents by 1e-4 relative, because XLA's CPU kernels may round differently
for a different per-device batch size. The test reports when they are bit-identical.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = [f"a photograph of lighthouse number {i}" for i in range(6)]  # 6 over 4 devices: pad 2
GEN = dict(steps=3, scheduler="euler_a", guidance=7.5, seed=1)  # euler_a: per-step noise too


# --------------------------------------------------------------------------------------------
# Workers (run in subprocesses)
# --------------------------------------------------------------------------------------------


def worker_devices(out: str) -> None:
    """6 prompts on 4 devices and on 1; records the shardings seen inside the loop."""
    import jax

    from sdjax import pipeline
    from tests._pipeline_util import random_pipeline

    assert jax.local_device_count() == 4, jax.devices()
    seen = []
    guided_unet = pipeline.guided_unet

    def spy(unet_params, x, *args, **kwargs):  # the UNet's input, inside the scan body
        jax.debug.inspect_array_sharding(x, callback=seen.append)
        return guided_unet(unet_params, x, *args, **kwargs)

    pipeline.guided_unet = spy
    steps_four, steps_one = [], []
    four = random_pipeline()
    one = random_pipeline(devices=jax.devices()[:1])
    r4 = four.generate(PROMPTS, progress=steps_four.append, **GEN)
    in_loop_four = list(seen)
    r1 = one.generate(PROMPTS, progress=steps_one.append, **GEN)

    (denoise,) = [c for key, c in four._compiled.items() if key[0] == "denoise"]
    padded = (8, 8, 8, 4)
    hlo = denoise.as_text()
    (while_line,) = [line for line in hlo.splitlines() if re.search(r"= \(.*\) while\(", line)]
    info = {
        "devices": [len(four.devices), len(one.devices)],
        "in_loop": [
            {
                "devices": len(s.device_set),
                "spec": list(s.spec) if hasattr(s, "spec") else None,
                "shard_shape": list(s.shard_shape(padded)),
                "replicated": s.is_fully_replicated,
            }
            for s in in_loop_four
        ],
        "compiled_in": str(denoise.input_shardings[0][1]),
        "compiled_out": str(denoise.output_shardings),
        "compiled_in_shard_shape": list(denoise.input_shardings[0][1].shard_shape(padded)),
        "while_carries_shard": "f32[2,8,8,4]" in while_line,
        "global_batch_in_hlo": "f32[8,8,8,4]" in hlo,
        "progress_calls": [len(steps_four), len(steps_one)],
    }
    pathlib.Path(out + ".json").write_text(json.dumps(info))
    np.savez(
        out + ".npz", images4=r4.images, images1=r1.images, latents4=r4.latents, latents1=r1.latents
    )


def worker_process(out: str) -> None:
    """One of several `jax.distributed` processes: generates its block of the prompts."""
    from sdjax import distributed

    info = distributed.initialize_from_env()
    from tests._pipeline_util import random_pipeline

    block = distributed.process_block(len(PROMPTS))
    result = random_pipeline().generate(PROMPTS[block], index_offset=block.start, **GEN)
    record = {**vars(info), "block": [block.start, block.stop]}
    pathlib.Path(f"{out}.json").write_text(json.dumps(record))
    np.savez(f"{out}.npz", images=result.images)


def _run_worker(name, out, devices, env=None, wait=True):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "tests.test_multidevice", name, str(out)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc.communicate(timeout=600) + (proc.returncode,) if wait else proc


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def _compare(a_images, b_images, a_latents=None, b_latents=None) -> bool:
    assert a_images.shape == b_images.shape
    assert np.abs(a_images.astype(int) - b_images.astype(int)).max() <= 1
    if a_latents is not None:
        rel = np.linalg.norm(a_latents - b_latents) / np.linalg.norm(b_latents)
        assert rel <= 1e-4, rel
    return bool(np.array_equal(a_images, b_images))


@pytest.fixture(scope="module")
def devices_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multidevice") / "devices"
    stdout, stderr, rc = _run_worker("devices", out, devices=4)
    assert rc == 0, stderr[-4000:]
    return json.loads(pathlib.Path(f"{out}.json").read_text()), np.load(f"{out}.npz")


def test_four_devices_match_one(devices_run):
    info, arrays = devices_run
    assert info["devices"] == [4, 1]
    assert arrays["images4"].shape == (6, 16, 16, 3)  # the padding (6 -> 8) is dropped
    identical = _compare(
        arrays["images4"], arrays["images1"], arrays["latents4"], arrays["latents1"]
    )
    print(f"1 vs 4 devices: images bit-identical: {identical}")
    assert len({im.tobytes() for im in arrays["images4"]}) == 6  # every image its own noise


def test_latents_are_split_inside_the_loop(devices_run):
    info, _ = devices_run
    four = [s for s in info["in_loop"] if s["devices"] == 4]
    assert four, info["in_loop"]
    for s in four:  # the UNet's input in the scan body: 8 padded images, 2 per device
        assert s["spec"] == ["batch"] and s["shard_shape"] == [2, 8, 8, 4]
        assert not s["replicated"]
    assert "'batch'" in info["compiled_in"] and "'batch'" in info["compiled_out"]
    assert info["compiled_in_shard_shape"] == [2, 8, 8, 4]
    # The compiled (partitioned) program's while loop carries one device's shard.
    assert info["while_carries_shard"] and not info["global_batch_in_hlo"]
    # The progress callback runs once per step, not once per device.
    assert info["progress_calls"] == [GEN["steps"], GEN["steps"]]


def test_two_processes_with_jax_distributed(devices_run, tmp_path):
    """Two `jax.distributed` processes on this host (2 CPU devices each), each generating
    its block of the 6 prompts, make the same images as one process making all 6."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for p in range(2):
        env = {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(p),
        }
        procs.append(_run_worker("process", tmp_path / f"p{p}", devices=2, env=env, wait=False))
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
    records = [json.loads((tmp_path / f"p{p}.json").read_text()) for p in range(2)]
    for p, r in enumerate(records):
        assert r["method"] == "explicit" and r["process_index"] == p
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 4, 2)
    assert [r["block"] for r in records] == [[0, 3], [3, 6]]
    images = np.concatenate([np.load(tmp_path / f"p{p}.npz")["images"] for p in range(2)])
    identical = _compare(images, devices_run[1]["images1"])
    print(f"1 vs 2 processes: images bit-identical: {identical}")


# --------------------------------------------------------------------------------------------
# sdjax.distributed without a cluster
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env,method",
    [
        ({}, None),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
            "explicit",
        ),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, "slurm"),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),
        ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "8"}, "ompi"),
        ({"SDJAX_DISTRIBUTED": "1"}, "forced"),
        (
            {
                "SDJAX_DISTRIBUTED": "0",
                "SLURM_JOB_ID": "7",
                "SLURM_STEP_NODELIST": "n1",
                "SLURM_NTASKS": "2",
            },
            None,
        ),
    ],
)
def test_detect(env, method):
    from sdjax import distributed

    got, kwargs = distributed.detect(env)
    assert got == method
    if method == "explicit":
        assert kwargs == {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3}


def test_detect_incomplete_explicit_env():
    from sdjax import distributed

    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID is not"):
        distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1"})
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "one"}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        distributed.detect(env)


def test_single_process_is_left_alone():
    from sdjax import distributed

    info = distributed.initialize_from_env({})
    assert info.method is None and info.process_count == 1 and info.process_index == 0


@pytest.mark.parametrize("n,count", [(6, 4), (6, 2), (1, 2), (0, 3), (17, 5)])
def test_process_block(n, count):
    from sdjax.distributed import process_block

    blocks = [process_block(n, p, count) for p in range(count)]
    assert [i for b in blocks for i in range(n)[b]] == list(range(n))
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------------------------
# The command-line tools on 4 devices
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from tests._pipeline_util import save_diffusers_checkpoint

    return save_diffusers_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sd")


def _run_module(module, *args, env=None):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "SDJAX_DISTRIBUTED": "0",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_generate_cli_prompts_file_on_four_devices(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    proc = _run_module(
        "experiments.generate",
        f"--checkpoint={checkpoint}",
        f"--prompts_file={prompts}",
        "--batch=3",
        "--steps=2",
        "--noprogress",
        "--nocompilation_cache",
        f"--out={tmp_path / 'out'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert len(record["devices"]) == 4 and record["device"]["device_count"] == 4
    assert record["num_images"] == 6 and len(record["images"]) == 6


def test_benchmark_on_four_devices(checkpoint, tmp_path):
    proc = _run_module(
        "experiments.benchmark",
        f"--checkpoint={checkpoint}",
        "--height=16",
        "--width=16",
        "--steps=2",
        "--batch_sizes=1,2",
        "--kernels=reference,xla",
        "--repeats=2",
        "--warmup=0",
        "--name=bench",
        env={"OUT": str(tmp_path)},  # common.results_dir()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "bench.json").read_text())
    rows = record["rows"]
    assert [(r["kernels"], r["batch_per_device"], r["images"]) for r in rows] == [
        ("reference", 1, 4),
        ("reference", 2, 8),
        ("xla", 1, 4),
        ("xla", 2, 8),
    ]
    for r in rows:
        assert r["images_per_s"] > 0 and len(r["all_s"]) == 2
        assert set(r["component_median_s"]) == {"text_encoder", "denoise", "vae_decode"}
        assert r["total_compile_s"] > 0 and r["speedup_vs_reference"] > 0
    assert (tmp_path / "bench.md").exists()


if __name__ == "__main__":
    globals()["worker_" + sys.argv[1]](sys.argv[2])
