"""experiments/make_autotune.py: which implementation `auto` records from a bench's rows."""

from __future__ import annotations

from experiments import make_autotune
from sdjax import autotune
from sdjax.shapes import ATTENTION_SHAPES, GEGLU_SHAPES, GROUP_NORM_SHAPES


def _geglu_key(name):
    s = GEGLU_SHAPES[name]
    return autotune.shape_key("geglu", s.x_shape, s.w_shape, "float16")


def test_geglu_by_kernel_time_with_the_hopper_kernel():
    """Device kernel time decides where the bench has it (not the launch-bound wall time);
    the Hopper kernel competes where it ran; a form off the reference is never chosen."""
    rows = [
        # wall time says XLA, kernel time says the Hopper kernel
        dict(shape="sd15_64", fused_ms=0.05, hopper_ms=0.05, xla_ms=0.04, fused_kernel_us=47.0,
             hopper_kernel_us=30.0, xla_kernel_us=60.0),
        # the Hopper kernel did not run (shape out of its scope): Triton against XLA
        dict(shape="sd21_12", fused_ms=0.03, xla_ms=0.02, fused_kernel_us=9.0, xla_kernel_us=12.0),
        # the fastest is wrong: skipped
        dict(shape="sd15_32", fused_ms=0.05, hopper_ms=0.04, xla_ms=0.06, fused_kernel_us=36.0,
             hopper_kernel_us=20.0, hopper_err=0.5, xla_kernel_us=40.0),
        # no kernel times (a CPU or older record): wall time, ours against XLA
        dict(shape="sd15_8", fused_ms=0.02, xla_ms=0.01),
    ]  # fmt: skip
    _, gg = make_autotune.norm_choices({"dtype": "float16", "geglu": rows})
    assert gg == {
        _geglu_key("sd15_64"): "pallas_hopper",
        _geglu_key("sd21_12"): "pallas",
        _geglu_key("sd15_32"): "pallas",
        _geglu_key("sd15_8"): "xla",
    }


def test_group_norm_by_kernel_time():
    s = GROUP_NORM_SHAPES["unet_64x64x320"]
    rows = [dict(shape="unet_64x64x320", ours_ms=0.05, xla_ms=0.04, ours_kernel_us=20.0,
                 xla_kernel_us=45.0)]  # fmt: skip
    gn, _ = make_autotune.norm_choices({"dtype": "float16", "group_norm": rows})
    assert gn == {autotune.shape_key("group_norm", s.shape, None, "float16"): "pallas"}


def test_attention_by_kernel_time_where_measured():
    """Rows with device kernel time decide by it at their shape (rows without it there, such as
    torch's, drop out); a shape without any is decided by the chained-call time."""
    rows = [
        dict(shape="sd15_cross_8", impl="flash", ms=0.0075, kernel_us=3.6, ok=True),
        dict(shape="sd15_cross_8", impl="cudnn", ms=0.0070, kernel_us=7.5, ok=True),
        dict(shape="sd15_cross_8", impl="torch", ms=0.0010, ok=True),
        dict(shape="sd15_cross_16", impl="flash", ms=0.008, ok=True),
        dict(shape="sd15_cross_16", impl="cudnn", ms=0.007, ok=True),
    ]
    choices = make_autotune.attention_choices({"dtype": "float16", "rows": rows})
    key = lambda n: autotune.shape_key(  # noqa: E731
        "attention", ATTENTION_SHAPES[n].q_shape, ATTENTION_SHAPES[n].kv_shape, "float16")
    assert choices == {key("sd15_cross_8"): "flash", key("sd15_cross_16"): "cudnn"}
