"""experiments/profile.py: the kernel classifier, the trace and HLO readers, and a CPU run of
the whole profile on the `tiny` config (the script's core function and its command line)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from experiments import profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel names as an H100 trace shows them (cuBLAS, cuDNN, XLA fusions, our Pallas kernels).
GPU_NAMES = [
    (
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_"
        "execute_segment_k_off_kernel__5x_cublas",
        "matmul",
    ),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopB_NNT", "matmul"),
    (
        "cutlass3x_sm90_tensorop_h64x128x16gemm_f16_f16_f32_void_f16_128x128x64_1x1x1_0_tnn_"
        "align8_warpspecialized_cooperative_epi_tma",
        "matmul",
    ),
    ("gemm_fusion_dot_123", "matmul"),
    ("triton_gemm_dot_5", "matmul"),
    ("sdjax_geglu", "matmul"),
    (
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_"
        "warpgroupsize1x1x1_g1_execute_kernel__5x_cudnn",
        "conv",
    ),
    ("convolution.3", "conv"),
    ("cudnn::fusion::fmha_fprop_kernel<__half, 128>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0", "attention"),
    ("sdjax_flash_attention", "attention"),
    ("sdjax_flash_hopper_mosaic_gpu", "attention"),
    ("sdjax_fused_softmax_logits", "attention"),
    ("triton_softmax_3", "attention"),
    ("sdjax_group_norm_stats", "norm"),
    ("sdjax_group_norm_fused", "norm"),
    ("sdjax_layer_norm", "norm"),
    ("sdjax_cross_attention", "attention"),
    ("sdjax_subpixel_interleave__2", "copy"),
    ("input_reduce_fusion", "norm"),
    ("input_reduce_fusion_12", "norm"),
    ("loop_multiply_fusion", "elementwise"),
    ("loop_convert_fusion_3", "elementwise"),
    ("loop_add_fusion_12", "elementwise"),
    ("wrapped_exponential", "elementwise"),
    ("copy", "copy"),
    ("copy_3", "copy"),
    ("transpose_12", "copy"),
    ("loop_transpose_fusion", "copy"),
    ("input_concatenate_fusion", "copy"),
    ("loop_dynamic_slice_fusion", "copy"),
    ("MemcpyD2D", "copy"),
    ("Memset", "copy"),
    ("void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true>(...)", "copy"),
    ("redzone_checker", "other"),
    ("some_unknown_kernel", "other"),
]


@pytest.mark.parametrize("name,kind", GPU_NAMES)
def test_classify_by_name(name, kind):
    assert profile.classify(name)[0] == kind
    assert kind in profile.KINDS


UNET = "jit(unet_step)/UNet2DConditionModel/down_blocks_0/down_blocks_0._attend/attentions_0"
VAE = "jit(vae_decode)/AutoencoderKL.decode/decoder/mid_block/attentions_0"
CUBLAS = GPU_NAMES[0][0]
CUDNN_CONV = GPU_NAMES[6][0]


@pytest.mark.parametrize(
    "name,op_name,kind,how",
    [
        # XLA's softmax and batched GEMMs inside an attention are attention
        (
            "input_reduce_fusion",
            f"{UNET}/transformer_blocks_0/attn1/vmap()/reduce_max",
            "attention",
            "scope",
        ),
        (
            "loop_exponential_fusion",
            f"{UNET}/transformer_blocks_0/attn2/vmap()/exp",
            "attention",
            "scope",
        ),
        (
            CUBLAS,
            f"{UNET}/transformer_blocks_0/attn1/vmap(BTNH,BSNH->BNTS)/dot_general",
            "attention",
            "scope",
        ),
        ("loop_divide_fusion", f"{VAE}/attentions_0/vmap()/div", "attention", "scope"),
        # ... but not the projections, the residual or the transformer's norms
        (CUBLAS, f"{UNET}/transformer_blocks_0/attn1/to_q/dot_general", "matmul", "name"),
        ("loop_add_fusion", f"{VAE}/attentions_0/to_q/add", "elementwise", "name"),
        ("loop_add_fusion", f"{UNET}/add", "elementwise", "name"),
        ("loop_multiply_fusion", f"{UNET}/transformer_blocks_0/norm1/mul", "norm", "scope"),
        ("loop_multiply_fusion", f"{VAE}/group_norm/mul", "norm", "scope"),
        (
            "loop_multiply_fusion",
            "jit(unet_step)/UNet2DConditionModel/up_blocks_1/resnets_0/norm1/logistic",
            "norm",
            "scope",
        ),
        # layout copies stay copies; library kernels keep their kind
        ("loop_transpose_fusion", f"{UNET}/transformer_blocks_0/norm1/transpose", "copy", "name"),
        (CUDNN_CONV, f"{UNET}/proj_in/conv_general_dilated", "conv", "name"),
        ("sdjax_group_norm_stats", f"{UNET}/transformer_blocks_0/attn1/vmap()/exp", "norm", "name"),
        # XLA:CPU's generic names take the scope's conv / matmul
        ("ynn_fusion.3", f"{UNET}/proj_in/conv_general_dilated", "conv", "scope"),
        ("ynn_fusion.4", f"{UNET}/transformer_blocks_0/ff/net_2/dot_general", "matmul", "scope"),
    ],
)
def test_classify_by_scope(name, op_name, kind, how):
    assert profile.classify(name, op_name=op_name) == (kind, how)


def test_classify_falls_back_to_the_hlo_op():
    # a cuDNN helper kernel whose name says nothing (or only "add") counts as its call's kind
    assert profile.classify("nhwcAddPaddingKernel", "cudnn-conv-bias-activation.3") == (
        "conv",
        "hlo_op",
    )
    assert profile.classify("mystery_kernel", "cublas-gemm.1") == ("matmul", "hlo_op")
    # cuDNN runs convolutions as implicit GEMMs, some with GEMM-like kernel names
    cutlass = GPU_NAMES[2][0]
    assert profile.classify(cutlass, "cudnn-conv-bias-activation.7") == ("conv", "hlo_op")
    assert profile.classify(cutlass, "custom-call.7") == ("matmul", "name")
    assert profile.classify(CUDNN_CONV, "custom-call.7") == ("conv", "name")
    assert profile.classify("mystery_kernel", "custom-call.7") == ("other", "none")
    assert profile.family("loop_add_fusion_12") == "loop_add_fusion"
    assert profile.family("input_reduce_fusion.3") == "input_reduce_fusion"


HLO = """HloModule jit_f, entry_computation_layout={(f16[2,4]{1,0})->f16[2,4]{1,0}}

%fused_computation (param_0: f16[2,4]) -> f16[2,4] {
  %param_0 = f16[2,4]{1,0} parameter(0)
  ROOT %multiply.1 = f16[2,4]{1,0} multiply(%param_0, %param_0), metadata={op_name="jit(f)/x"}
}

ENTRY %main.5 (Arg_0.1: f16[2,4]) -> f16[2,4] {
  %Arg_0.1 = f16[2,4]{1,0} parameter(0), metadata={op_name="x"}
  %custom-call.2 = (f16[2,4]{1,0}, s8[1024]{0}) custom-call(f16[2,4]{1,0} %Arg_0.1, f16[2,4]{1,0} %Arg_0.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/attn1/to_q/dot_general"}
  %get-tuple-element.3 = f16[2,4]{1,0} get-tuple-element(%custom-call.2), index=0
  ROOT %loop_multiply_fusion = f16[2,4]{1,0} fusion(%get-tuple-element.3), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/norm1/mul"}
}
"""


def test_parse_hlo():
    hlo = profile.parse_hlo(HLO)
    assert profile._module_name(HLO) == "jit_f"
    # the result without the s8 scratch, plus both operands
    assert hlo["custom-call.2"]["bytes"] == 16 + 16 + 16
    assert hlo["custom-call.2"]["op_name"] == "jit(f)/attn1/to_q/dot_general"
    assert hlo["loop_multiply_fusion"]["bytes"] == 16 + 16
    assert hlo["loop_multiply_fusion"]["opcode"] == "fusion"
    assert "fused_computation" not in hlo


def _gpu_row(line, name, start, dur, op=None, module="jit_f"):
    stats = {"hlo_op": op, "hlo_module": module} if op else {}
    return ("/device:GPU:0", line, name, start, dur, stats)


def test_select_and_summarize_gpu_events():
    """A GPU-shaped trace: the stream lines count; overhead, counters and the host do not."""
    stream = "Stream #13(Kernel,MemcpyD2D)"
    raw = [
        _gpu_row(stream, CUBLAS, 0, 2e6, "custom-call.2"),
        _gpu_row(stream, "loop_multiply_fusion", 2e6, 1e6, "loop_multiply_fusion"),
        _gpu_row(stream, "MemcpyD2D", 3e6, 0.5e6),
        _gpu_row(stream, "loop_add_fusion", 4e6, 1e6, "loop_add_fusion.9", module="jit_other"),
        _gpu_row("CUPTI overhead", "overhead", 0, 1e6),
        _gpu_row("Stream #13(Kernel)", "power_mw", 0, 0),
        ("/host:CPU", "python", "PjitFunction(f)", 0, 9e6, {"hlo_op": "x"}),
    ]
    events = profile.select_kernels(raw, "gpu")
    assert [e.name for e in events] == [
        CUBLAS,
        "loop_multiply_fusion",
        "MemcpyD2D",
        "loop_add_fusion",
    ]
    rec = profile.summarize(
        events,
        calls=1,
        hlo=profile.parse_hlo(HLO),
        module="jit_f",
        flops={"matmul": 1e12, "conv": 0.0, "attention": 0.0},
        matmul_tflops=1000.0,
        copy_gbps=1e-3,  # 1 kB/ms: 32 bytes take 0.032 ms
    )
    kinds = {k["kind"]: k for k in rec["kinds"]}
    assert rec["dropped_other_modules"] == 1
    assert rec["kernel_ms"] == pytest.approx(3.5)
    assert kinds["matmul"]["ms"] == pytest.approx(2.0)
    assert kinds["matmul"]["flop_floor_ms"] == pytest.approx(1.0)
    assert kinds["matmul"]["floor_ms"] == pytest.approx(1.0)
    assert kinds["matmul"]["gap"] == pytest.approx(2.0)
    # the fusion sits in norm1's scope: norm, with its HLO bytes as its floor
    assert kinds["norm"]["ms"] == pytest.approx(1.0)
    assert kinds["norm"]["byte_floor_ms"] == pytest.approx(0.032)
    assert kinds["copy"]["ms"] == pytest.approx(0.5)
    assert sum(k["pct"] for k in rec["kinds"]) == pytest.approx(100.0)
    # top_ops keeps the slowest instructions, as many as asked (--top_ops)
    assert [o["hlo_op"] for o in rec["top_ops"]][:1] == ["custom-call.2"]
    short = profile.summarize(events, calls=1, hlo=profile.parse_hlo(HLO), module="jit_f",
                              flops={"matmul": 1e12, "conv": 0.0, "attention": 0.0},
                              matmul_tflops=1000.0, copy_gbps=1e-3, top_ops=1)  # fmt: skip
    assert [o["hlo_op"] for o in short["top_ops"]] == ["custom-call.2"]


def test_chrome_json_reader_on_a_gpu_shaped_trace(tmp_path):
    trace = {
        "traceEvents": [
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Kernel)"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "tid": 7, "ts": 10.0, "dur": 2.5, "name": CUBLAS,
             "args": {"hlo_op": "custom-call.2", "hlo_module": "jit_f"}},
            {"ph": "X", "pid": 1, "tid": 7, "ts": 13.0, "dur": 1.0, "name": "loop_add_fusion",
             "args": {"hlo_op": "loop_add_fusion", "hlo_module": "jit_f"}},
            {"ph": "X", "pid": 2, "tid": 1, "ts": 0.0, "dur": 50.0, "name": "PjitFunction(f)",
             "args": {"hlo_op": "x"}},
        ]
    }  # fmt: skip
    (tmp_path / "plugins" / "profile" / "run").mkdir(parents=True)
    with gzip.open(tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz", "wt") as f:
        json.dump(trace, f)
    events, how = profile.read_trace(str(tmp_path), "gpu")
    assert "JSON" in how
    assert [(e.name, e.dur_ns, e.hlo_op) for e in events] == [
        (CUBLAS, 2500.0, "custom-call.2"),
        ("loop_add_fusion", 1000.0, "loop_add_fusion"),
    ]


def _trace_small(log_dir):
    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(0) + a.T.sum(1))
    a = jnp.ones((128, 128))
    jax.block_until_ready(f(a, a))
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(3):
            jax.block_until_ready(f(a, a))


def test_xplane_and_json_readers_agree():
    backend = jax.default_backend()
    with tempfile.TemporaryDirectory() as d:
        _trace_small(d)
        from_xplane, how = profile.read_trace(d, backend)
        from_json, how_json = profile.read_trace(d, backend, prefer_json=True)
    assert "ProfileData" in how and "JSON" in how_json
    assert len(from_xplane) >= 3 and any(e.hlo_op for e in from_xplane)
    ops = sorted(str(e.hlo_op) for e in from_xplane)
    assert ops == sorted(str(e.hlo_op) for e in from_json)
    total = sum(e.dur_ns for e in from_xplane)
    assert sum(e.dur_ns for e in from_json) == pytest.approx(total, rel=1e-3)


def test_importing_registers_no_flags():
    # experiments.convert registers --config/--dtype too; absl refuses a second definer
    assert "matmul_size" not in flags.FLAGS
    assert "copy_mib" not in flags.FLAGS


def _check_record(record):
    assert set(record["programs"]) == set(profile.PROGRAMS)
    for name, p in record["programs"].items():
        kinds = {k["kind"]: k for k in p["kinds"]}
        assert set(kinds) == set(profile.KINDS)
        assert p["kernel_ms"] > 0
        assert sum(k["ms"] for k in p["kinds"]) == pytest.approx(p["kernel_ms"])
        assert all(k["kind"] in profile.KINDS for k in p["kernels"])
        if name == "text_encoder":  # no convolutions; its projections, attention, LayerNorms
            assert kinds["conv"]["ms"] == 0
            assert min(kinds[k]["ms"] for k in ("matmul", "attention", "norm")) > 0
        else:
            assert kinds["conv"]["ms"] > 0
        assert p["floor_ms"] > 0
        assert p["flops"]["attention"] == pytest.approx(p["flops"]["attention_jaxpr"])
        assert p["events_with_hlo_op"] > 0.5  # all on CPU; GPU memcpys may have none
    unet = record["programs"]["unet_step"]
    assert {k["kind"] for k in unet["kernels"]} >= {"conv", "matmul", "attention", "norm"}
    # Inside the scan, figures are per step: about one UNet call's work, FLOPs of one step.
    loop = record["programs"]["denoise_loop"]
    assert loop["steps_per_call"] == record["loop_steps"] >= 2
    assert loop["flops"] == unet["flops"]
    conv = {p: next(k for k in record["programs"][p]["kinds"] if k["kind"] == "conv")
            for p in ("unet_step", "denoise_loop")}  # fmt: skip
    assert 0.5 < conv["denoise_loop"]["kernels_per_call"] / conv["unet_step"]["kernels_per_call"] < 2
    # The slowest HLO instructions are named with their opcode and shape.
    assert unet["top_ops"] and unet["top_ops"][0]["ms"] >= unet["top_ops"][-1]["ms"]
    assert any(o["opcode"] and o["shape"] for o in unet["top_ops"])
    assert record["rules"]["kind_rules"]
    assert record["failures"] == []


def test_profile_tiny(tmp_path):
    """The core function on `tiny` (CPU in CI; it runs the same on a GPU)."""
    record = profile.profile(
        "tiny", "float32", "xla", calls=2, wall_calls=3, matmul_size=128, copy_mib=2,
        loop_steps=2,
    )  # fmt: skip
    _check_record(record)
    assert record["compiler_options"] == {}  # the pipeline's defaults on CPU: none
    paths, md = profile.write_outputs(record, tmp_path)
    assert paths["json"].name == "profile_tiny_float32_xla.json"
    assert json.loads(paths["json"].read_text())["config"] == "tiny"
    assert "## UNet step" in md and "## VAE decode" in md and "| kind | ms/call |" in md
    assert "## text encoder" in md
    assert "inside the denoising scan" in md and "| HLO instruction |" in md
    assert paths["md"].read_text() == md


def test_command_line(tmp_path):
    """The script as the GPU run starts it (in a subprocess: its flags stay out of pytest)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    args = [
        "--config=tiny",
        "--kernels=xla",
        "--calls=2",
        "--matmul_size=128",
        "--copy_mib=2",
        "--nocompilation_cache",
        "--loop_steps=2",
        "--dump_hlo",
        "--xla_option=xla_gpu_enable_triton_gemm=false",  # a DebugOptions field, valid on CPU
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.profile", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith(".")  # the markdown is printed last
    assert "# Profile: tiny" in proc.stdout
    record = json.loads((tmp_path / "profile_tiny_float32_xla.json").read_text())
    _check_record(record)
    assert record["compiler_options"] == {"xla_gpu_enable_triton_gemm": False}
    assert "XLA options: {'xla_gpu_enable_triton_gemm': False}" in proc.stdout
    for program in profile.PROGRAMS:  # --dump_hlo: the optimized HLO of each program
        assert (tmp_path / f"{program}.hlo.txt").read_text().lstrip().startswith("HloModule")


def test_unknown_program_is_refused():
    with pytest.raises(ValueError, match="unknown programs"):
        profile.profile("tiny", "float32", "xla", programs=("unet_stepp",))


def test_impl_overrides_replace_one_op_of_the_preset():
    from absl import app

    from experiments import profile
    from sdjax import ops

    assert profile._implementations("auto", []) == "auto"
    impls = profile._implementations("auto", ["upsample_conv=subpixel", "conv3x3=reference"])
    assert impls == ops.Implementations(
        attention="auto", group_norm="auto", geglu="auto", layer_norm="auto",
        conv3x3="reference", upsample_conv="subpixel", interleave="auto", conv_planes="auto",
        conv1x1="auto", qkv_projection="auto",
    )  # fmt: skip
    for bad in ("upsample_conv", "winograd=yes", "conv3x3=fast"):
        with pytest.raises(app.UsageError, match="--impl"):
            profile._implementations("auto", [bad])


def test_busy_time_is_the_union_of_kernel_intervals():
    """Two overlapping kernels and a later one: busy counts the overlap once, and the
    overlap is charged to the kernel that started second."""
    ev = [
        profile.KernelEvent("a", start_ns=0.0, dur_ns=10.0, line="s", hlo_op="a.1"),
        profile.KernelEvent("b", start_ns=6.0, dur_ns=10.0, line="s", hlo_op="b.1"),
        profile.KernelEvent("c", start_ns=20.0, dur_ns=5.0, line="s", hlo_op="c.1"),
        profile.KernelEvent("d", start_ns=21.0, dur_ns=2.0, line="s", hlo_op="d.1"),  # inside c
    ]
    busy, overlap = profile._busy_and_overlap(ev)
    assert busy == 16.0 + 5.0
    assert overlap == {"b.1": 4.0, "d.1": 2.0}


def test_implementations_label_names_the_preset_and_its_overrides():
    import dataclasses

    from sdjax import ops

    auto = ops.Implementations.preset("auto")
    assert profile.implementations_label("auto") == "auto"
    assert profile.implementations_label(auto) == "auto"
    changed = dataclasses.replace(auto, attention="reference")
    assert profile.implementations_label(changed) == "auto+attention=reference"
    assert profile.implementations_label(ops.Implementations.preset("xla")) == "xla"
