"""Where the time of a UNet step and a VAE decode goes: GPU time per kernel and per kind,
each kind against its own floor.

    python -m experiments.profile --config sd15 --dtype float16 --kernels auto

1. Builds the pipeline's UNet (one guided step: batch 2, latent 64x64 at 512 px) and VAE
   decoder (batch 1) with random weights, compiles both, times them untraced (back-to-back
   calls), then captures a `jax.profiler` trace of --calls calls of each.
2. Reads the trace back with jaxlib's own reader (`jax.profiler.ProfileData` over the
   `*.xplane.pb`, in jaxlib 0.10.2 and 0.11.2; no TensorBoard needed). Where that reader is
   missing or fails, it reads the Chrome-trace JSON that the profiler writes beside it
   (`*.trace.json.gz`, plain JSON). GPU: every kernel, memcpy and memset on the device's
   stream lines, with the `hlo_op`/`hlo_module` that XLA's launch annotation attaches. CPU:
   the host events that carry an `hlo_op` (XLA:CPU's thunks), innermost only.
3. Classifies each kernel by name (`KIND_RULES`, a regex table, first match wins). Names that
   say nothing specific (XLA's `loop_*_fusion`, `input_reduce_fusion`, ...) are refined by the
   HLO op's source scope (`SCOPE_RULES`: the Flax module path in the op's metadata), so that
   XLA's softmax around attention counts as attention and the fusions of a GroupNorm as norm.
4. Measures in the same run a big matmul (--matmul_size^3) and a big device-to-device copy
   (--copy_mib) with `experiments.common.time_jax`: the matmul rate and the copy bandwidth.
   Floors per kind: FLOPs / matmul rate for conv, matmul and attention (FLOPs counted from
   the program's jaxpr; attention from `sdjax.shapes.AttentionShape` of every transformer
   block, cross-checked against the jaxpr), bytes / copy bandwidth for every kind (bytes: the
   operands and results of each HLO instruction that ran, from the optimized HLO: the floor of
   the ops as XLA partitioned them; fusing two ops lowers it). A kind's floor is the larger of
   the two; its gap is measured / floor. The step's floor is the sum of the kinds' floors
   (kernels run one after another); `cost_analysis()` gives the program's FLOPs and bytes
   accessed for comparison.
5. Writes profile_<config>_<dtype>_<kernels>.json, .md and .png (if matplotlib imports) to
   `experiments.common.results_dir()` and prints the markdown last.

Caveat: while a trace runs, XLA replaces command buffers (CUDA graphs) by plain launches
(`--xla_enable_command_buffers_during_profiling=false` is the default) and each launch pays the
tracer's overhead, so the traced span per call is longer than the untraced wall time. Kernel
durations are what the tables use.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line. Registered only when run as a script: tests import this module for
    its functions, and `--config`/`--dtype` are also registered by experiments.convert (absl
    refuses a flag defined by two modules)."""
    from experiments import common

    common.define_pipeline_flags()
    flags.DEFINE_multi_string(
        "impl", [], "OP=NAME: override one op of the preset, repeatable (e.g. upsample_conv=subpixel)"
    )
    flags.DEFINE_integer("calls", 5, "traced calls of each program")
    flags.DEFINE_integer("wall_calls", 20, "back-to-back calls of the untraced timing")
    flags.DEFINE_integer("matmul_size", 8192, "n of the n^3 matmul that measures the matmul rate")
    flags.DEFINE_integer("copy_mib", 256, "MiB of the copy that measures the copy bandwidth")
    flags.DEFINE_integer("top", 30, "kernels listed per program in the markdown")
    flags.DEFINE_bool("keep_trace", False, "copy the raw traces (xplane.pb) to the results dir")
    flags.DEFINE_bool("compilation_cache", True, "use the persistent compilation cache")
    flags.DEFINE_string("tag", "", "suffix of the output file names")
    flags.DEFINE_list(
        "programs", list(PROGRAMS), f"programs to profile, of {', '.join(PROGRAMS)}"
    )
    flags.DEFINE_integer(
        "loop_steps", 4, "guided UNet steps in one call of the denoise_loop program"
    )
    flags.DEFINE_bool("dump_hlo", False, "write each program's optimized HLO beside the JSON")
    flags.DEFINE_integer("top_ops", TOP_OPS, "HLO instructions kept per program (JSON), by time")
    flags.DEFINE_bool(
        "prepare_weights",
        True,
        "denoise_loop and vae_decode take their weight-only part made beforehand, as the "
        "pipeline runs them (sdjax.pipeline.prepare_unet, prepare_vae_decode); false: made "
        "in every call",
    )
    flags.DEFINE_multi_string(
        "xla_option",
        [],
        "NAME=VALUE: an XLA compile option for every program, repeatable; none given: the "
        "pipeline's defaults (sdjax.pipeline.default_compiler_options)",
    )


# unet_step: one guided UNet call on its own (params are arguments: whatever XLA does to them,
# layout changes included, is paid per call). denoise_loop: the pipeline's jitted scan of
# --loop_steps guided steps, reported per step: what a step costs inside generation, where XLA
# may hoist loop-invariant work (weight layout changes, the context's K/V projections) out.
# text_encoder: the CLIP encoder on a guided batch (prompt and negative prompt, 77 tokens each),
# as the pipeline runs it (padded to sdjax.pipeline.TEXT_PAD_MULTIPLE tokens).
PROGRAMS = ("unet_step", "denoise_loop", "vae_decode", "text_encoder")

TOP_OPS = 60  # HLO instructions listed per program (JSON), by time

KINDS = ("conv", "matmul", "attention", "norm", "elementwise", "copy", "other")

# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------

# (kind, regex over the kernel name, strong). Searched in order, case-insensitive; the first
# match wins. Strong rules name a library or one of our kernels: the kernel is that kind
# whatever the op around it. Weak rules match XLA's generated names (a fusion is named after its
# root op), which the op's source scope may refine (SCOPE_RULES).
KIND_RULES: tuple[tuple[str, str, bool], ...] = (
    # our Pallas kernels: pl.pallas_call(name="sdjax_<op>")
    ("attention",
     r"sdjax_flash_attention|sdjax_flash_hopper|sdjax_fused_softmax|sdjax_cross_attention",
     True),  # fmt: skip
    ("norm", r"sdjax_group_norm|sdjax_layer_norm", True),
    ("matmul", r"sdjax_geglu", True),
    ("copy", r"sdjax_subpixel_interleave", True),
    # cuDNN fused attention (fmha / sdpa engines), FlashAttention-style kernels
    ("attention", r"fmha|sdpa|flash_?att|fused_mha|mha_fwd|dot_product_attention", True),
    # cuDNN / CUTLASS convolutions (implicit GEMM, Winograd, FFT), before the GEMM rule
    (
        "conv",
        r"conv(?!ert)|fprop|dgrad|wgrad|implicit_(gemm|convolve|precomp)|winograd|nhwckrsc|fft2d",
        True,
    ),
    # cuDNN's layout changes, copy engines
    ("copy", r"nchwtonhwc|nhwctonchw|foldednhwc|nhwctofolded|memcpy|memset", True),
    # cuBLAS / cuBLASLt / CUTLASS / XLA-Triton GEMMs; XLA:CPU's dot thunks
    ("matmul", r"gemm|gemv|cublas|cutlass|nvjet|xmma|splitkreduce|matmul|^dot([._]|$)", True),
    # XLA's generated names
    ("attention", r"softmax", False),
    ("norm", r"reduc|norm|rsqrt|variance", False),
    (
        "copy",
        r"copy|transpose|concatenate|(^|_)pad(_|$)|slice|dynamic_update|gather|scatter|reverse",
        False,
    ),
    (
        "elementwise",
        r"fusion|loop_|wrapped_|multiply|add|subtract|divide|convert|select|exp|log|tanh|"
        r"logistic|sigmoid|silu|gelu|erf|maximum|minimum|negate|sqrt|power|compare|broadcast|"
        r"iota|clamp|abs",
        False,
    ),
)
_RULES = tuple((kind, re.compile(p, re.IGNORECASE), strong) for kind, p, strong in KIND_RULES)

_ATTENTION_MODULE = re.compile(r"^(attn\d+|attentions_\d+|self_attn)$")  # UNet, VAE; CLIP
# First scope under an attention module that is not the attention itself.
_NOT_CORE = re.compile(
    r"^(to_\w+|[qkv]_proj|out_proj|proj_(in|out)|norm\d*|group_norm|ff|net_\d+|"
    r"transformer_blocks_\d+)$"
)
# Ops placed directly in an attention module's scope that belong to softmax(QK^T)V.
_CORE_OPS = {
    "dot_general", "exp", "exp2", "reduce_max", "reduce_sum", "sub", "div", "mul", "max",
    "pallas_call", "dot_product_attention", "custom_call", "select_n",
}  # fmt: skip
_NORM_MODULE = re.compile(
    r"^(norm\d*|group_norm|conv_norm_out|norm_out|layer_norm\d*|final_layer_norm)$"
)


def _scope_kind(op_name: str) -> str | None:
    """attention / norm / conv / matmul from an HLO op's metadata op_name, or None.

    op_name is the jax name stack, e.g. "jit(step)/UNet2DConditionModel/down_blocks_0/
    down_blocks_0._attend/attentions_0/transformer_blocks_0/attn1/vmap()/exp".
    """
    for path in op_name.split(";"):
        parts = path.split("/")
        prim = parts[-1]
        idx = [i for i, p in enumerate(parts[:-1]) if _ATTENTION_MODULE.match(p)]
        if idx:
            rest = parts[idx[-1] + 1 :]
            if (len(rest) >= 2 and not _NOT_CORE.match(rest[0])) or (
                len(rest) == 1 and prim in _CORE_OPS
            ):
                return "attention"
        if any(_NORM_MODULE.match(p) for p in parts[:-1]):
            return "norm"
        if prim.startswith("conv_general_dilated"):
            return "conv"
        if prim == "dot_general":
            return "matmul"
    return None


# (scope kind, the name kinds it may replace). Applied only to weak (or no) name matches,
# except that an attention scope also takes GEMMs: XLA's attention is two batched GEMMs.
SCOPE_RULES: tuple[tuple[str, frozenset[str]], ...] = (
    ("attention", frozenset({"matmul", "elementwise", "norm", "attention", "other"})),
    ("norm", frozenset({"elementwise", "norm", "attention", "other"})),
    ("conv", frozenset({"elementwise", "other"})),
    ("matmul", frozenset({"elementwise", "other"})),
)


def classify_name(name: str) -> tuple[str, bool]:
    """(kind, strong) of a kernel name by KIND_RULES; ("other", False) if nothing matches."""
    for kind, pattern, strong in _RULES:
        if pattern.search(name):
            return kind, strong
    return "other", False


def classify(name: str, hlo_op: str | None = None, op_name: str | None = None) -> tuple[str, str]:
    """(kind, how) of one kernel.

    how: "name" (KIND_RULES on the kernel's name); "hlo_op" (KIND_RULES on the HLO
    instruction's name, which wins where it is a strong match and the kernel's name is not, or
    names a convolution that the library ran as a GEMM-named kernel, or where the kernel's name
    matches nothing: a cuDNN helper kernel of a `cudnn-conv` call counts as conv); "scope"
    (refined by the op's source scope, SCOPE_RULES); "none" (kind "other").
    """
    kind, strong = classify_name(name)
    how = "name" if kind != "other" else "none"
    if hlo_op:
        op_kind, op_strong = classify_name(hlo_op)
        if (
            (op_strong and not strong)
            or (op_strong and op_kind == "conv" and kind == "matmul")
            or (kind == "other" and op_kind != "other")
        ):
            kind, strong, how = op_kind, op_strong, "hlo_op"
    if op_name:
        scope = _scope_kind(op_name)
        for scope_kind, replaces in SCOPE_RULES:
            if scope == scope_kind and kind in replaces and scope != kind:
                if not strong or (scope == "attention" and kind == "matmul"):
                    return scope, "scope"
    return kind, how


def family(name: str) -> str:
    """A kernel name without XLA's instance suffixes: loop_add_fusion_12 -> loop_add_fusion."""
    out = re.sub(r"([._]\d+)+$", "", name)
    return out or name


# --------------------------------------------------------------------------------------------
# Reading a trace
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelEvent:
    """One kernel (or memcpy/memset) execution. hlo_op, hlo_module and op_name come from
    XLA's annotation of the launch (stats of the trace event) where the trace has them."""

    name: str
    start_ns: float
    dur_ns: float
    line: str
    hlo_op: str | None = None
    hlo_module: str | None = None
    op_name: str | None = None


def _profile_data_class():
    """jaxlib's XSpace reader: `jax.profiler.ProfileData` (jax 0.10.2 and 0.11.2 have it)."""
    try:
        from jax.profiler import ProfileData

        return ProfileData
    except ImportError:
        try:
            from jaxlib._profile_data import ProfileData

            return ProfileData
        except ImportError:
            return None


def _plane_prefix(backend: str) -> str:
    return "/device:GPU" if backend == "gpu" else "/host:CPU"


def _raw_from_xplane(path: str, plane_prefix: str):
    """(plane, line, name, start_ns, dur_ns, stats) of the events of the planes whose name
    starts with plane_prefix, via jaxlib's reader."""
    data = _profile_data_class().from_file(path)
    for plane in data.planes:
        if not plane.name.startswith(plane_prefix):
            continue
        for line in plane.lines:
            for ev in line.events:
                stats = {}
                for key, value in ev.stats:
                    stats.setdefault(key, value)
                yield (
                    plane.name,
                    line.name,
                    ev.name,
                    float(ev.start_ns),
                    float(ev.duration_ns),
                    stats,
                )


def _raw_from_chrome_json(path: str, plane_prefix: str):
    """The same from a Chrome-trace JSON (perfetto_trace.json.gz / *.trace.json.gz): "X"
    events, their process (plane) and thread (line) names from the "M" events."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process, thread = {}, {}
    for ev in events:
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            process[ev["pid"]] = ev["args"]["name"]
        elif ev.get("ph") == "M" and ev.get("name") == "thread_name":
            thread[(ev["pid"], ev.get("tid"))] = ev["args"]["name"]
    for ev in events:
        if ev.get("ph") != "X":
            continue
        pid = ev.get("pid")
        plane = process.get(pid, str(pid))
        if not plane.startswith(plane_prefix):
            continue
        yield (
            plane,
            thread.get((pid, ev.get("tid")), str(ev.get("tid"))),
            ev.get("name", ""),
            float(ev.get("ts", 0.0)) * 1e3,
            float(ev.get("dur", 0.0)) * 1e3,
            ev.get("args", {}),
        )


def _event(name, start, dur, line, stats) -> KernelEvent:
    def stat(key):
        value = stats.get(key)
        return None if value is None else str(value)

    return KernelEvent(name, start, dur, line, stat("hlo_op"), stat("hlo_module"), stat("op_name"))


def select_kernels(raw, backend: str) -> list[KernelEvent]:
    """The events that are device work. GPU: the stream lines of the /device:GPU planes (not
    the CUPTI overhead or counter lines). CPU: the /host:CPU events that carry an `hlo_op`
    stat (XLA:CPU's thunks), innermost only: a thunk that contains another is dropped."""
    prefix = _plane_prefix(backend)
    rows = [r for r in raw if r[0].startswith(prefix) and r[4] > 0]
    if backend == "gpu":
        if any(r[1].startswith("Stream") for r in rows):
            rows = [r for r in rows if r[1].startswith("Stream")]
        rows = [r for r in rows if "overhead" not in r[1].lower()]
        return [_event(n, s, d, f"{p}/{ln}", st) for p, ln, n, s, d, st in rows]
    rows = [r for r in rows if "hlo_op" in r[5] and not r[2].startswith("end: ")]
    by_line = collections.defaultdict(list)
    for r in rows:
        by_line[r[1]].append(r)
    out = []
    for line, evs in by_line.items():
        evs.sort(key=lambda r: (r[3], -r[4]))
        for i, (_, _, name, start, dur, stats) in enumerate(evs):
            nxt = evs[i + 1] if i + 1 < len(evs) else None
            if nxt is not None and nxt[3] < start + dur and nxt[3] + nxt[4] <= start + dur:
                continue  # contains the next event: a parent thunk
            out.append(_event(name, start, dur, line, stats))
    return out


def read_trace(log_dir: str, backend: str, *, prefer_json: bool = False):
    """(kernel events, how the trace was read) from a jax.profiler log dir: the xplane.pb
    through jaxlib's ProfileData; else (reader missing, failing, or no kernel events) the
    Chrome-trace JSON that the profiler writes beside it (*.trace.json.gz, or the
    perfetto_trace.json.gz of `create_perfetto_trace=True`): plain JSON, no TensorBoard."""

    def find(pattern):
        return sorted(glob.glob(os.path.join(log_dir, "**", pattern), recursive=True))

    prefix, problems = _plane_prefix(backend), []
    xplanes = find("*.xplane.pb")
    if xplanes and _profile_data_class() is not None and not prefer_json:
        try:
            events = select_kernels(
                [r for p in xplanes for r in _raw_from_xplane(p, prefix)], backend
            )
            if events:
                return events, "xplane.pb via jax.profiler.ProfileData"
            problems.append("xplane.pb: no kernel events")
        except Exception as e:  # fall back to the JSON, and say so
            problems.append(f"xplane.pb: {type(e).__name__}: {e}")
    for path in find("perfetto_trace.json.gz") + find("*.trace.json.gz"):
        events = select_kernels(list(_raw_from_chrome_json(path, prefix)), backend)
        how = f"Chrome-trace JSON {os.path.basename(path)}"
        return events, how + (f" ({'; '.join(problems)})" if problems else "")
    raise RuntimeError(f"no readable trace under {log_dir}: {problems}")


# --------------------------------------------------------------------------------------------
# The optimized HLO: bytes and source scope of each instruction
# --------------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([^\]]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _shape_bytes(shape: str, *, skip_bytes_arrays: bool = False) -> float:
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        if skip_bytes_arrays and dtype in ("u8", "s8"):
            continue  # a library call's scratch workspace
        n = 1
        for d in dims.split(","):
            d = re.sub(r"\D", "", d)
            n *= int(d) if d else 1
        total += n * size
    return total


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group that opens at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def parse_hlo(text: str) -> dict[str, dict]:
    """{instruction: {"opcode", "bytes", "op_name"}} of an HLO module's text. bytes: the
    result's plus every operand's (each read once, the result written once): what a kernel
    must move at least. A library call's u8/s8 scratch in a tuple result is not counted."""
    result_bytes, parsed = {}, {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m or line.lstrip().startswith(("HloModule", "ENTRY", "//")):
            continue
        name, rest = m.group(1), m.group(2)
        if rest.startswith("("):
            end = _balanced(rest, 0)
            shape, tail = rest[:end], rest[end:].lstrip()
        else:
            shape, _, tail = rest.partition(" ")
        op = re.match(r"([\w\-]+)\(", tail)
        if not op:
            continue
        opcode = op.group(1)
        args = tail[op.end() - 1 : _balanced(tail, op.end() - 1)]
        operands = re.findall(r"%([\w.\-]+)", args)
        if not operands:  # operands printed without '%'
            operands = [a.strip().split(" ")[-1] for a in args[1:-1].split(",") if a.strip()]
        out = _shape_bytes(
            shape, skip_bytes_arrays=opcode == "custom-call" and shape.startswith("(")
        )
        result_bytes[name] = out
        op_name = _OP_NAME.search(line)
        parsed[name] = {
            "opcode": opcode,
            "shape": shape[:160],
            "operands": operands,
            "out_bytes": out,
            "op_name": op_name.group(1) if op_name else None,
        }
    return {
        name: {
            "opcode": p["opcode"],
            "shape": p["shape"],
            "bytes": p["out_bytes"] + sum(result_bytes.get(o, 0.0) for o in p["operands"]),
            "op_name": p["op_name"],
        }
        for name, p in parsed.items()
    }


def _module_name(text: str) -> str | None:
    m = re.match(r"\s*HloModule\s+([\w.\-]+)", text)
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------
# FLOPs: from the jaxpr (conv, matmul) and from the attention shapes
# --------------------------------------------------------------------------------------------


def _sub_jaxprs(params):
    for value in params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(x, "eqns"):
                yield x
            elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr


def jaxpr_flops(jaxpr) -> collections.Counter:
    """FLOPs (2 per multiply-add) of convolutions ("conv"), dots without batch dimensions
    ("matmul") and dots with batch dimensions ("batched_dot": attention's QK^T and PV)."""
    out = collections.Counter()
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        if prim == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec
            per_out = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
            out["conv"] += 2 * math.prod(eqn.outvars[0].aval.shape) * per_out
        elif prim == "dot_general":
            (contract, _), (batch, _) = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops = 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            out["batched_dot" if batch else "matmul"] += flops
        else:
            subs = [jaxpr_flops(s) for s in _sub_jaxprs(eqn.params)]
            if prim == "cond" and subs:
                subs = [max(subs, key=lambda c: sum(c.values()))]
            times = eqn.params.get("length", 1) if prim == "scan" else 1
            for sub in subs:
                for k, v in sub.items():
                    out[k] += v * times
    return out


def unet_attention_shapes(
    cfg, latent: int, batch: int = 2, context_len: int = 77, shared_copies: int = 1
):
    """Every attention of one UNet call as sdjax.shapes.AttentionShape: a self- and a
    cross-attention per transformer block, down, mid and up. shared_copies: `batch` is a
    guided batch whose samples are shared by that many copies (`pipeline.guided_unet`'s
    share_prefix): the first self-attention, before the first cross-attention, runs at
    batch / shared_copies."""
    from sdjax.shapes import AttentionShape

    out = []
    n = len(cfg.block_out_channels)

    def add(level: int, transformers: int):
        side = latent // 2**level
        c, heads = cfg.block_out_channels[level], cfg.num_attention_heads[level]
        for _ in range(transformers):
            for kind, kv in (("self", side * side), ("cross", context_len)):
                b = batch // shared_copies if not out else batch  # the first: self, shared
                name = f"{kind}_{side}" + ("" if b == batch else f"_batch{b}")
                out.append(AttentionShape(name, b, side * side, heads, c // heads, kv))

    for i, kind in enumerate(cfg.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            add(i, cfg.layers_per_block * cfg.transformer_layers_per_block[i])
    add(n - 1, cfg.transformer_layers_per_block[-1])
    for i, kind in enumerate(cfg.up_block_types):
        j = n - 1 - i
        if kind == "CrossAttnUpBlock2D":
            add(j, (cfg.layers_per_block + 1) * cfg.transformer_layers_per_block[j])
    return out


def vae_attention_shapes(cfg, latent: int, batch: int = 1):
    from sdjax.shapes import AttentionShape

    if not cfg.mid_block_add_attention:
        return []
    c = cfg.block_out_channels[-1]
    return [AttentionShape(f"vae_mid_{c}", batch, latent * latent, 1, c, latent * latent)]


def text_attention_shapes(cfg, batch: int = 2):
    """The text encoder's causal self-attentions, one per layer, on the tokens as the pipeline
    pads them (`sdjax.pipeline.TEXT_PAD_MULTIPLE`), counted in full (the jaxpr's products are;
    causality halves what a fused kernel needs)."""
    from sdjax.pipeline import TEXT_PAD_MULTIPLE
    from sdjax.shapes import AttentionShape

    length = -(-cfg.max_position_embeddings // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE
    heads = cfg.num_attention_heads
    shape = AttentionShape(f"text_{length}", batch, length, heads, cfg.hidden_size // heads, length)
    return [shape] * cfg.num_hidden_layers


def _registry_names(shapes, prefix: str) -> dict[str, int]:
    """{name: count}, named as in sdjax.shapes.ATTENTION_SHAPES where the shape is there."""
    from sdjax.shapes import ATTENTION_SHAPES

    def key(s):
        return (s.batch, s.q_len, s.heads, s.head_dim, s.kv_len)

    known = {key(s): name for name, s in ATTENTION_SHAPES.items()}
    counts = collections.Counter()
    for s in shapes:
        counts[known.get(key(s), f"{prefix}{s.name}")] += 1
    return dict(counts)


# --------------------------------------------------------------------------------------------
# Profiling one program
# --------------------------------------------------------------------------------------------


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception as e:  # not every backend has one
        return {"error": f"{type(e).__name__}: {e}"}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def _wall_ms(compiled, args, calls: int, repeats: int = 3) -> float:
    """Median wall time per call of `calls` back-to-back calls (untraced)."""
    import jax

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready([compiled(*args) for _ in range(calls)])
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def trace_program(compiled, args, calls: int, log_dir: str, backend: str):
    """Runs `calls` calls under jax.profiler and returns (kernel events, how it was read)."""
    import jax

    jax.block_until_ready(compiled(*args))
    with jax.profiler.trace(log_dir):
        jax.block_until_ready([compiled(*args) for _ in range(calls)])
    return read_trace(log_dir, backend)


def _busy_and_overlap(events: list[KernelEvent]) -> tuple[float, dict]:
    """(ns covered by the union of the events' intervals, {hlo_op: ns of its kernels' time
    that an earlier-started kernel also covered})."""
    busy, reach = 0.0, -math.inf
    overlap = collections.Counter()
    for e in sorted(events, key=lambda e: e.start_ns):
        end = e.start_ns + e.dur_ns
        covered = min(max(reach - e.start_ns, 0.0), e.dur_ns)
        if covered and e.hlo_op:
            overlap[e.hlo_op] += covered
        busy += e.dur_ns - covered  # all of it covered where it ends before `reach`
        reach = max(reach, end)
    return busy, dict(overlap)


def summarize(
    events: list[KernelEvent],
    *,
    calls: int,
    hlo: dict,
    module: str | None,
    flops: dict,
    matmul_tflops: float | None,
    copy_gbps: float | None,
    top_ops: int = TOP_OPS,
) -> dict:
    """Per-kind and per-kernel tables of one program's trace (per call)."""
    modules = collections.Counter(e.hlo_module for e in events)
    dropped = 0
    if module and any(e.hlo_module == module for e in events):
        dropped = sum(1 for e in events if e.hlo_module not in (module, None))
        events = [e for e in events if e.hlo_module in (module, None)]

    kernel_rows = collections.defaultdict(
        lambda: {"ns": 0.0, "count": 0, "names": set(), "hlo_ops": set()}
    )
    kind_ns = collections.Counter()
    op_kind_ns = collections.defaultdict(collections.Counter)  # hlo_op -> kind -> ns
    op_launches = collections.Counter()  # hlo_op -> kernels
    scope_moved = collections.Counter()
    unclassified = collections.Counter()
    for e in events:
        op_name = (hlo.get(e.hlo_op, {}).get("op_name") if e.hlo_op else None) or e.op_name
        kind, how = classify(e.name, e.hlo_op, op_name)
        if how == "scope":
            scope_moved[f"{classify(e.name, e.hlo_op)[0]}->{kind}"] += e.dur_ns
        if kind == "other":
            unclassified[e.name] += e.dur_ns
        row = kernel_rows[(family(e.name), kind, how)]
        row["ns"] += e.dur_ns
        row["count"] += 1
        row["names"].add(e.name)
        if e.hlo_op:
            row["hlo_ops"].add(e.hlo_op)
            op_kind_ns[e.hlo_op][kind] += e.dur_ns
            op_launches[e.hlo_op] += 1
        kind_ns[kind] += e.dur_ns

    total_ns = sum(kind_ns.values())
    # Bytes per kind: each HLO instruction that ran, counted once per call (these programs have
    # no loops), under the kind that took most of its time.
    kind_bytes = collections.Counter()
    kind_known_ns = collections.Counter()
    for op, per_kind in op_kind_ns.items():
        if op in hlo:
            kind = per_kind.most_common(1)[0][0]
            kind_bytes[kind] += hlo[op]["bytes"]
            for k, ns in per_kind.items():
                kind_known_ns[k] += ns

    kinds = []
    for kind in KINDS:
        ms = kind_ns[kind] / calls / 1e6
        row = {
            "kind": kind,
            "ms": ms,
            "pct": 100.0 * kind_ns[kind] / total_ns if total_ns else 0.0,
            "kernels_per_call": sum(r["count"] for (_, k, _), r in kernel_rows.items() if k == kind)
            / calls,
            "gflop": flops.get(kind, 0.0) / 1e9
            if kind in ("conv", "matmul", "attention")
            else None,
            "mbytes": kind_bytes[kind] / 1e6 if kind_ns[kind] else None,
            "bytes_coverage": kind_known_ns[kind] / kind_ns[kind] if kind_ns[kind] else None,
        }
        flop_floor = (
            flops.get(kind, 0.0) / (matmul_tflops * 1e12) * 1e3
            if matmul_tflops and row["gflop"] is not None
            else None
        )
        byte_floor = (
            kind_bytes[kind] / (copy_gbps * 1e9) * 1e3 if copy_gbps and kind_ns[kind] else None
        )
        if kind == "other":
            byte_floor = None  # unknown work: no floor
        row["flop_floor_ms"] = flop_floor
        row["byte_floor_ms"] = byte_floor
        floors = [f for f in (flop_floor, byte_floor) if f]
        row["floor_ms"] = max(floors) if floors else None
        row["gap"] = ms / row["floor_ms"] if row["floor_ms"] and ms else None
        kinds.append(row)

    kernels = sorted(
        (
            {
                "kernel": fam,
                "kind": kind,
                "how": how,
                "ms": r["ns"] / calls / 1e6,
                "per_call": r["count"] / calls,
                "pct": 100.0 * r["ns"] / total_ns if total_ns else 0.0,
                "distinct_names": len(r["names"]),
                "hlo_ops": sorted(r["hlo_ops"])[:5],
            }
            for (fam, kind, how), r in kernel_rows.items()
        ),
        key=lambda r: -r["ms"],
    )
    # The HLO instructions that took most time (attributable where the trace names the op, not
    # a command buffer around it): opcode, result shape and source scope say what they are.
    top_ops = [
        {
            "hlo_op": op,
            "kind": per_kind.most_common(1)[0][0],
            "ms": sum(per_kind.values()) / calls / 1e6,
            "per_call": op_launches[op] / calls,
            "opcode": hlo.get(op, {}).get("opcode"),
            "shape": hlo.get(op, {}).get("shape"),
            "mbytes": hlo[op]["bytes"] / 1e6 if op in hlo else None,
            "op_name": (hlo.get(op, {}).get("op_name") or "")[-160:],
        }
        for op, per_kind in sorted(op_kind_ns.items(), key=lambda kv: -sum(kv[1].values()))[
            :top_ops
        ]
    ]
    starts = [e.start_ns for e in events]
    ends = [e.start_ns + e.dur_ns for e in events]
    busy_ns, overlap_by_op = _busy_and_overlap(events)
    for row in top_ops:
        row["overlap_ms"] = overlap_by_op.get(row["hlo_op"], 0.0) / calls / 1e6
    return {
        "top_ops": top_ops,
        "kernel_ms": total_ns / calls / 1e6,
        # the union of the kernels' intervals: less than kernel_ms where kernels overlap (two
        # streams, or a kernel launched early that waits on its predecessor), whose summed
        # durations then count the same time twice
        "busy_ms": busy_ns / calls / 1e6,
        "kernels_per_call": len(events) / calls,
        "traced_span_ms": (max(ends) - min(starts)) / calls / 1e6 if events else 0.0,
        "kinds": kinds,
        "floor_ms": sum(r["floor_ms"] or 0.0 for r in kinds),
        "kernels": kernels,
        "unclassified": {k: v / calls / 1e6 for k, v in unclassified.most_common()},
        "reclassified_by_scope_ms": {k: v / calls / 1e6 for k, v in scope_moved.items()},
        "events_with_hlo_op": sum(1 for e in events if e.hlo_op) / max(len(events), 1),
        "hlo_modules": {str(k): v for k, v in modules.items()},
        "dropped_other_modules": dropped,
    }


def profile_program(
    name: str,
    fn,
    args,
    *,
    flops_fn,
    attention_shapes,
    shape_prefix: str,
    calls: int,
    wall_calls: int,
    matmul_tflops,
    copy_gbps,
    backend: str,
    keep_trace_dir: str | None = None,
    steps_per_call: int = 1,
    dump_hlo_dir: str | None = None,
    flops_args=None,
    compiler_options: dict | None = None,
    top_ops: int = TOP_OPS,
) -> dict:
    """Compiles fn, times it untraced, traces `calls` calls and summarizes the trace.

    `steps_per_call`: fn runs that many steps of a loop; every figure is then per step
    (time, launches, and bytes: a loop body's instructions appear once in the HLO).
    """
    import jax

    from sdjax import pipeline

    t0 = time.perf_counter()
    # The parameters (args[0]) in the layouts XLA picks, as the pipeline runs them.
    lowered = pipeline.lower_auto_layouts(fn, *args)
    compiled = lowered.compile(compiler_options=compiler_options or None)
    args = (pipeline.place_params(compiled, args[0]), *args[1:])
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    if dump_hlo_dir:
        with open(os.path.join(dump_hlo_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    try:
        hlo, hlo_error = parse_hlo(text), None
    except Exception as e:  # no bytes floors and no scopes, said in the record
        traceback.print_exc()
        hlo, hlo_error = {}, f"{type(e).__name__}: {e}"

    # FLOPs of one step: flops_fn over flops_args (default: fn's own arguments).
    counted = jaxpr_flops(jax.make_jaxpr(flops_fn)(*(flops_args or args)).jaxpr)
    attention = sum(s.flops for s in attention_shapes)
    flops = {"conv": counted["conv"], "matmul": counted["matmul"], "attention": attention}

    jax.block_until_ready(compiled(*args))
    wall = _wall_ms(compiled, args, wall_calls) / steps_per_call
    with tempfile.TemporaryDirectory(prefix=f"sdjax_profile_{name}_") as log_dir:
        events, how = trace_program(compiled, args, calls, log_dir, backend)
        if keep_trace_dir:
            for i, path in enumerate(
                glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
            ):
                dst = os.path.join(keep_trace_dir, f"{name}_{i}.xplane.pb")
                with open(path, "rb") as src, open(dst, "wb") as out:
                    out.write(src.read())
    if not events:
        raise RuntimeError(f"{name}: the trace has no {backend} kernel events (read as {how})")
    record = summarize(
        events,
        calls=calls * steps_per_call,
        hlo=hlo,
        module=_module_name(text),
        flops=flops,
        matmul_tflops=matmul_tflops,
        copy_gbps=copy_gbps,
        top_ops=top_ops,
    )
    cost = _cost(compiled)
    compute = matmul_tflops * 1e12 if matmul_tflops else None
    record.update(
        {
            "program": name,
            "module": _module_name(text),
            "trace_read_as": how,
            "hlo_instructions": len(hlo),
            "hlo_parse_error": hlo_error,
            "calls": calls,
            "steps_per_call": steps_per_call,
            "compile_s": compile_s,
            "wall_ms": wall,
            "gaps_ms": max(wall - record["kernel_ms"], 0.0),
            "cost_analysis": cost,
            "flops": {**flops, "attention_jaxpr": counted["batched_dot"]},
            "attention_shapes": _registry_names(attention_shapes, shape_prefix),
            "flop_floor_ms": sum(flops.values()) / compute * 1e3 if compute else None,
            "cost_flop_floor_ms": (cost.get("flops") or 0) / compute * 1e3 if compute else None,
            "cost_byte_floor_ms": (cost.get("bytes_accessed") or 0) / (copy_gbps * 1e9) * 1e3
            if copy_gbps
            else None,
        }
    )
    return record


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


def measure_rates(dtype, matmul_size: int, copy_mib: int) -> dict:
    """The matmul rate (n^3, dtype) and the device-to-device copy bandwidth, by time_jax."""
    import jax
    import jax.numpy as jnp

    from experiments import common

    n = matmul_size
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    mm = common.time_jax(lambda a, b: a @ b, a, b, calls=5, repeats=7)
    del a, b
    x = jnp.zeros((copy_mib * 2**20 // 4,), jnp.float32)
    cp = common.time_jax(jnp.copy, x, calls=10, repeats=7)
    st = common.time_jax(lambda x: x * 2, x, calls=10, repeats=7)
    del x
    mm_ms, cp_ms, st_ms = mm["median_ms"], cp["median_ms"], st["median_ms"]
    moved = 2 * copy_mib * 2**20  # read + write

    def gbps(ms):
        return moved / (ms * 1e-3) / 1e9 if ms > 0 else None

    copy_gbps, stream_gbps = gbps(cp_ms), gbps(st_ms)
    # The floors' bandwidth. A copy far faster than x*2 (also read + write) was not a copy of
    # every byte: then x*2's.
    suspect = not copy_gbps or (stream_gbps and copy_gbps > 3 * stream_gbps)
    return {
        "matmul_size": n,
        "matmul_dtype": jnp.dtype(dtype).name,
        "matmul_ms": mm_ms,
        "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12 if mm_ms > 0 else None,
        "copy_mib": copy_mib,
        "copy_ms": cp_ms,
        "copy_gbps": stream_gbps if suspect else copy_gbps,
        "copy_measured_gbps": copy_gbps,
        "stream_gbps": stream_gbps,
    }


def profile(
    config_name: str = "sd15",
    dtype: str | None = None,
    kernels="auto",
    *,
    resolution: int | None = None,
    calls: int = 5,
    wall_calls: int = 20,
    matmul_size: int = 8192,
    copy_mib: int = 256,
    keep_trace_dir: str | None = None,
    programs: tuple[str, ...] = PROGRAMS,
    loop_steps: int = 4,
    dump_hlo_dir: str | None = None,
    compiler_options: dict | None = None,
    prepare_weights: bool = True,
    top_ops: int = TOP_OPS,
) -> dict:
    """The run as a record (see the module docstring). `kernels`: a preset name or an
    `sdjax.ops.Implementations`. `compiler_options`: XLA compile
    options for every traced program (e.g. {"xla_gpu_enable_triton_gemm": True}); None: the
    pipeline's defaults (`sdjax.pipeline.default_compiler_options`). `prepare_weights`: the
    denoise_loop and vae_decode programs take their weight-only part made beforehand
    (`sdjax.pipeline.prepare_unet`, `prepare_vae_decode`), as the pipeline runs them; False
    makes it in every call."""
    import jax
    import jax.numpy as jnp

    from experiments import common
    from sdjax import config as sd_config
    from sdjax import ops, pipeline, schedulers, weights
    from sdjax.models import clip
    from sdjax.models.vae import AutoencoderKL

    if compiler_options is None:
        compiler_options = pipeline.default_compiler_options()
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"unknown programs {sorted(unknown)}; known: {', '.join(PROGRAMS)}")
    if loop_steps < 1:
        raise ValueError(f"loop_steps={loop_steps} must be >= 1")

    backend = jax.default_backend()
    dtype = common.default_dtype(dtype)
    jdtype = jnp.dtype(dtype)
    config = sd_config.preset(config_name)
    impls = kernels if isinstance(kernels, ops.Implementations) else ops.Implementations.preset(kernels)
    res = resolution or config.default_resolution
    latent = res // config.vae.downscale
    t0 = time.perf_counter()
    params = weights.random_params(config, seed=0, dtype=jdtype)
    unet_params = jax.device_put(params["unet"])
    vae_params = jax.device_put(params["vae"])
    text_params = jax.device_put(params["text_encoder"])
    del params
    setup_s = time.perf_counter() - t0

    ucfg, vcfg = config.unet, config.vae
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (1, latent, latent, ucfg.in_channels), jnp.float32)
    ctx = jax.random.normal(jax.random.fold_in(key, 1), (1, 77, ucfg.cross_attention_dim))
    uctx = jax.random.normal(jax.random.fold_in(key, 2), (1, 77, ucfg.cross_attention_dim))
    unet_args = (
        unet_params,
        x,
        jnp.asarray(500, jnp.int32),
        ctx.astype(jdtype),
        uctx.astype(jdtype),
        jnp.asarray(7.5, jnp.float32),
    )
    z = jax.random.normal(jax.random.fold_in(key, 3), (1, latent, latent, vcfg.latent_channels))
    vae_args = (vae_params, z.astype(jdtype))
    tcfg = config.text_encoder
    # token ids of a guided batch: random ids in the vocabulary (the encoder's cost does not
    # depend on them), 77 per prompt
    ids = jax.random.randint(
        jax.random.fold_in(key, 4), (2, tcfg.max_position_embeddings), 0, tcfg.vocab_size
    )
    text_args = (text_params, ids)

    def unet_step_with(impl):
        def unet_step(p, x, t, ctx, uctx, scale):
            with ops.use(impl):
                return pipeline.guided_unet(
                    p, x, t, ctx, uctx, scale, unet_config=ucfg, dtype=jdtype
                )

        return unet_step

    scheduler = schedulers.make("ddim", config.scheduler, loop_steps)
    loop_inputs = {"params": unet_params}
    if prepare_weights:  # made once, outside the traced calls, as the pipeline does
        loop_inputs["prepared"] = pipeline.prepare_unet(
            unet_params, unet_config=ucfg, sample_hw=(latent, latent), dtype=jdtype, kernels=impls,
        )  # fmt: skip
    loop_args = (loop_inputs, x, ctx.astype(jdtype), uctx.astype(jdtype), jnp.float32(7.5))

    def denoise_loop_with(impl):
        def denoise(inputs, x, ctx, uctx, scale):
            return pipeline.denoise_loop(
                inputs["params"], x, ctx, uctx, scale, unet_config=ucfg, scheduler=scheduler,
                dtype=jdtype, kernels=impl, prepared=inputs.get("prepared"),
            )  # fmt: skip

        return denoise

    vae_inputs = {"params": vae_params}
    if prepare_weights:  # the upsamplers' phase kernels made once, as the pipeline does
        vae_inputs["prepared"] = pipeline.prepare_vae_decode(
            vae_params, vae_config=vcfg, latent_hw=(latent, latent), dtype=jdtype, kernels=impls
        )

    def vae_decode_with(impl):
        def vae_decode(inputs, z):
            with ops.use(impl):
                variables = {"params": inputs["params"], **inputs.get("prepared", {})}
                return AutoencoderKL(vcfg).apply(variables, z, method="decode")

        return vae_decode

    def text_encoder_with(impl):
        def text_encoder(p, ids):
            with ops.use(impl):
                return clip.encode(
                    p, ids, tcfg, dtype=jdtype, pad_multiple=pipeline.TEXT_PAD_MULTIPLE
                )

        return text_encoder

    rates = measure_rates(jdtype, matmul_size, copy_mib)
    common_kw = dict(
        calls=calls,
        wall_calls=wall_calls,
        matmul_tflops=rates["matmul_tflops"],
        copy_gbps=rates["copy_gbps"],
        backend=backend,
        keep_trace_dir=keep_trace_dir,
        dump_hlo_dir=dump_hlo_dir,
        compiler_options=compiler_options,
        top_ops=top_ops,
    )
    # FLOPs are counted on the "xla" preset's jaxpr: the same math, with no Pallas call hiding
    # its matmuls. The traced program is the chosen preset's.
    xla = ops.Implementations.preset("xla")
    runs = {
        "unet_step": lambda: profile_program(
            "unet_step",
            unet_step_with(impls),
            unet_args,
            flops_fn=unet_step_with(xla),
            attention_shapes=unet_attention_shapes(ucfg, latent, batch=2, shared_copies=2),
            shape_prefix=f"{config_name}_",
            **common_kw,
        ),
        "denoise_loop": lambda: profile_program(
            "denoise_loop",
            denoise_loop_with(impls),
            loop_args,
            flops_fn=unet_step_with(xla),
            flops_args=unet_args,
            attention_shapes=unet_attention_shapes(ucfg, latent, batch=2, shared_copies=2),
            shape_prefix=f"{config_name}_",
            steps_per_call=loop_steps,
            **common_kw,
        ),
        "vae_decode": lambda: profile_program(
            "vae_decode",
            vae_decode_with(impls),
            ({**vae_inputs}, *vae_args[1:]),
            flops_fn=vae_decode_with(xla),
            flops_args=({"params": vae_params}, *vae_args[1:]),  # FLOPs of the textbook form
            attention_shapes=vae_attention_shapes(vcfg, latent, batch=1),
            shape_prefix="",
            **common_kw,
        ),
        "text_encoder": lambda: profile_program(
            "text_encoder",
            text_encoder_with(impls),
            text_args,
            flops_fn=text_encoder_with(xla),
            attention_shapes=text_attention_shapes(tcfg, batch=2),
            shape_prefix="",
            **common_kw,
        ),
    }
    results = {}
    for name, run in runs.items():
        if name not in programs:
            continue
        try:
            results[name] = run()
        except Exception as e:  # recorded, and the other program still runs
            traceback.print_exc()
            results[name] = {"program": name, "error": f"{type(e).__name__}: {e}"[:2000]}
    return {
        "device": common.device_info(),
        "config": config_name,
        "dtype": dtype,
        "kernels": implementations_label(kernels),
        "implementations": dataclasses.asdict(impls),
        "compiler_options": dict(compiler_options or {}),
        "resolution": res,
        "latent": latent,
        "unet_batch": 2,
        "loop_steps": loop_steps,
        "prepare_weights": prepare_weights,
        "vae_batch": 1,
        "setup_s": setup_s,
        "rates": rates,
        "rules": {
            "kind_rules": [list(r) for r in KIND_RULES],
            "scope_rules": [[k, sorted(v)] for k, v in SCOPE_RULES],
        },
        "programs": results,
        "failures": [f"{k}: {v['error']}" for k, v in results.items() if "error" in v],
        "op_fallbacks": ops.fallbacks(),
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(v, spec=".3g"):
    return "" if v is None else format(v, spec)


_KIND_COLUMNS = {  # record key -> markdown header
    "kind": "kind",
    "ms": "ms/call",
    "pct": "% of kernel time",
    "kernels_per_call": "kernels/call",
    "gflop": "GFLOP",
    "mbytes": "MB moved",
    "bytes_coverage": "bytes known",
    "flop_floor_ms": "FLOP floor ms",
    "byte_floor_ms": "byte floor ms",
    "floor_ms": "floor ms",
    "gap": "gap (x floor)",
}
_KERNEL_COLUMNS = {
    "kernel": "kernel",
    "kind": "kind",
    "how": "by",
    "ms": "ms/call",
    "per_call": "launches/call",
    "pct": "% of kernel time",
    "hlo_op": "hlo_op (first)",
}


_OP_COLUMNS = {
    "hlo_op": "HLO instruction",
    "kind": "kind",
    "ms": "ms/call",
    "overlap_ms": "of it overlapped, ms",
    "per_call": "launches/call",
    "opcode": "opcode",
    "shape": "result shape",
    "op_name": "source scope (tail)",
}


def _table(rows, columns: dict) -> str:
    from experiments import common

    return common.markdown_table(
        [{columns[k]: v for k, v in row.items() if k in columns} for row in rows],
        list(columns.values()),
    )


def _program_markdown(p: dict, title: str, top: int) -> str:
    cost, fl = p["cost_analysis"], p["flops"]
    rows = [k for k in p["kinds"] if k["ms"] or k["floor_ms"]]
    rows.append(
        {
            "kind": "**all kernels**",
            "ms": p["kernel_ms"],
            "pct": 100.0,
            "kernels_per_call": p["kernels_per_call"],
            "floor_ms": p["floor_ms"],
            "gap": p["kernel_ms"] / p["floor_ms"] if p["floor_ms"] else None,
        }
    )
    rows.append({"kind": "gaps (untraced wall - kernels)", "ms": p["gaps_ms"]})
    md = (
        f"\n## {title}\n\n"
        f"Untraced wall {p['wall_ms']:.4g} ms/call; device kernel time {p['kernel_ms']:.4g} "
        f"ms/call in {p['kernels_per_call']:.0f} kernels (busy {p.get('busy_ms', 0.0):.4g} ms: "
        f"the union of their intervals); traced span {p['traced_span_ms']:.4g} "
        f"ms/call ({p['calls']} traced calls, read from {p['trace_read_as']}).\n\n"
        f"FLOPs: conv {fl['conv'] / 1e9:.4g} G, matmul {fl['matmul'] / 1e9:.4g} G, attention "
        f"{fl['attention'] / 1e9:.4g} G (from the shapes; the jaxpr's batched dots: "
        f"{fl['attention_jaxpr'] / 1e9:.4g} G). cost_analysis: "
        f"{_fmt((cost.get('flops') or 0) / 1e9, '.4g')} GFLOP, "
        f"{_fmt((cost.get('bytes_accessed') or 0) / 1e6, '.4g')} MB accessed.\n\n"
        f"Floors: the kinds' floors summed {p['floor_ms']:.4g} ms; every FLOP at the matmul rate "
        f"{_fmt(p['flop_floor_ms'], '.4g')} ms; cost_analysis FLOPs "
        f"{_fmt(p['cost_flop_floor_ms'], '.4g')} ms, its bytes at the copy bandwidth "
        f"{_fmt(p['cost_byte_floor_ms'], '.4g')} ms.\n\n"
    )
    md += _table(rows, _KIND_COLUMNS)
    if p["reclassified_by_scope_ms"]:
        moved = ", ".join(f"{k} {v:.3g} ms" for k, v in p["reclassified_by_scope_ms"].items())
        md += f"\nRefined by source scope (ms/call): {moved}.\n"
    md += f"\nTop {top} kernels (name families: instance suffixes stripped):\n\n"
    krows = [
        {**k, "kernel": k["kernel"][:100], "hlo_op": (k["hlo_ops"] or [""])[0]}
        for k in p["kernels"][:top]
    ]
    md += _table(krows, _KERNEL_COLUMNS)
    ops_top = [o for o in p.get("top_ops", []) if not o["hlo_op"].startswith("command_buffer")]
    if ops_top:
        md += f"\nTop {min(top, len(ops_top))} HLO instructions by time (what they are):\n\n"
        orows = [
            {**o, "shape": (o["shape"] or "")[:70], "op_name": o["op_name"][-90:]}
            for o in ops_top[:top]
        ]
        md += _table(orows, _OP_COLUMNS)
    if p["unclassified"]:
        md += "\nUnclassified kernel names (kind `other`; refine KIND_RULES):\n\n"
        md += "".join(f"- `{n}`: {ms:.3g} ms\n" for n, ms in list(p["unclassified"].items())[:40])
    else:
        md += "\nUnclassified kernel names: none.\n"
    return md


def markdown(record: dict, top: int = 30) -> str:
    r, dev = record["rates"], record["device"]
    md = (
        f"# Profile: {record['config']} {record['resolution']}x{record['resolution']}, "
        f"{record['dtype']}, kernels={record['kernels']}\n\n"
        f"device: {dev['device_kind']} ({dev['backend']}), jax {dev['jax']}. "
        f"Implementations: {record['implementations']}."
        f"{' XLA options: ' + str(record['compiler_options']) + '.' if record.get('compiler_options') else ''}\n\n"
        f"Measured in the same run: matmul {_fmt(r['matmul_tflops'], '.4g')} TFLOP/s "
        f"({r['matmul_size']}^3 {r['matmul_dtype']}), copy {_fmt(r['copy_gbps'], '.4g')} GB/s "
        f"({r['copy_mib']} MiB device-to-device, read + write; x*2 streams at "
        f"{_fmt(r['stream_gbps'], '.4g')} GB/s). A kind's floor is the larger "
        "of its FLOPs at the matmul rate and its bytes (operands + results of the HLO ops it "
        "ran) at the copy bandwidth.\n"
    )
    titles = {
        "unet_step": f"UNet step (batch {record['unet_batch']}, guided)",
        "denoise_loop": f"UNet step inside the denoising scan ({record.get('loop_steps')} "
        "guided steps per call; figures per step)",
        "vae_decode": f"VAE decode (batch {record['vae_batch']})",
        "text_encoder": "text encoder (batch 2: prompt and negative prompt)",
    }
    for key, p in record["programs"].items():
        if "error" in p:
            md += f"\n## {titles.get(key, key)}\n\nFAILED: {p['error']}\n"
        else:
            md += _program_markdown(p, titles.get(key, key), top)
    if record["op_fallbacks"]:
        md += f"\nop fallbacks: {record['op_fallbacks']}\n"
    md += "\n## Classification (first match wins; weak matches may be refined by scope)\n\n"
    md += "| kind | kernel-name regex (case-insensitive) | strong |\n|---|---|---|\n"
    md += "".join(f"| {k} | `{p.replace('|', chr(92) + '|')}` | {s} |\n" for k, p, s in KIND_RULES)
    md += "\nScope rules (HLO op_name): " + "; ".join(
        f"{k} replaces {sorted(v)}" for k, v in SCOPE_RULES
    )
    return md + ".\n"


def plot(record: dict, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    progs = {k: p for k, p in record["programs"].items() if "error" not in p}
    if not progs:
        return False
    fig, axes = plt.subplots(1, len(progs), figsize=(6 * len(progs), 4), squeeze=False)
    for ax, (name, p) in zip(axes[0], progs.items(), strict=True):
        rows = [k for k in p["kinds"] if k["ms"] or k["floor_ms"]]
        labels = [k["kind"] for k in rows] + ["gaps"]
        ms = [k["ms"] for k in rows] + [p["gaps_ms"]]
        floor = [k["floor_ms"] or 0.0 for k in rows] + [0.0]
        ys = range(len(labels))
        ax.barh([y - 0.2 for y in ys], ms, height=0.4, label="measured")
        ax.barh([y + 0.2 for y in ys], floor, height=0.4, label="floor")
        ax.set_yticks(list(ys), labels)
        ax.invert_yaxis()
        ax.set_xlabel("ms per call")
        ax.set_title(f"{name}: {p['kernel_ms']:.3g} ms kernels, floor {p['floor_ms']:.3g} ms")
        ax.legend()
    fig.suptitle(
        f"{record['config']} {record['dtype']} kernels={record['kernels']} on "
        f"{record['device']['device_kind']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(record: dict, out_dir, *, top: int = 30, tag: str = "") -> tuple[dict, str]:
    """Writes the JSON, markdown and PNG; returns ({suffix: path}, markdown)."""
    from experiments import common

    stem = f"profile_{record['config']}_{record['dtype']}_{record['kernels']}{tag}"
    md = markdown(record, top=top)
    paths = {"json": common.write_json(out_dir / f"{stem}.json", record)}
    paths["md"] = out_dir / f"{stem}.md"
    paths["md"].write_text(md)
    try:
        if plot(record, out_dir / f"{stem}.png"):
            paths["png"] = out_dir / f"{stem}.png"
    except Exception:  # the chart is a convenience; the JSON and markdown are written
        traceback.print_exc()
    return paths, md


def implementations_label(impls) -> str:
    """A file-name-safe name of an `sdjax.ops.Implementations`: the preset it equals, else the
    nearest preset and its overrides ("auto+attention=reference")."""
    from sdjax import ops

    if isinstance(impls, str):
        return impls

    def diff(preset):
        return [f"{f}={getattr(impls, f)}" for f in ops.Implementations.fields()
                if getattr(impls, f) != getattr(preset, f)]  # fmt: skip

    name, changed = min(((n, diff(p)) for n, p in ops.PRESETS.items()), key=lambda t: len(t[1]))
    return "+".join([name, *changed])


def _implementations(preset: str, overrides: list[str]):
    """The preset with each OP=NAME of `overrides` replaced (a usage error if malformed)."""
    import dataclasses

    from sdjax import ops

    impls = ops.Implementations.preset(preset)
    for item in overrides:
        op, sep, name = item.partition("=")
        if not sep or op not in ops.Implementations.fields():
            raise app.UsageError(
                f"--impl {item!r}: want OP=NAME with OP one of {ops.Implementations.fields()}"
            )
        try:
            impls = dataclasses.replace(impls, **{op: name})
        except ValueError as e:  # an unknown implementation name
            raise app.UsageError(f"--impl {item!r}: {e}") from None
    return impls if overrides else preset


def main(argv):
    del argv
    from experiments import common

    if FLAGS.compilation_cache:
        common.enable_compilation_cache()
    out = common.results_dir()
    t0 = time.perf_counter()
    record = profile(
        FLAGS.config,
        FLAGS.dtype,
        _implementations(FLAGS.kernels, FLAGS.impl),
        resolution=FLAGS.resolution,
        calls=FLAGS.calls,
        wall_calls=FLAGS.wall_calls,
        matmul_size=FLAGS.matmul_size,
        copy_mib=FLAGS.copy_mib,
        keep_trace_dir=str(out) if FLAGS.keep_trace else None,
        programs=tuple(FLAGS.programs),
        loop_steps=FLAGS.loop_steps,
        dump_hlo_dir=str(out) if FLAGS.dump_hlo else None,
        top_ops=FLAGS.top_ops,
        compiler_options=(
            common.parse_xla_options(FLAGS.xla_option) if FLAGS.xla_option else None
        ),
        prepare_weights=FLAGS.prepare_weights,
    )
    record["total_s"] = time.perf_counter() - t0
    _, md = write_outputs(record, out, top=FLAGS.top, tag=FLAGS.tag)
    print(f"total {record['total_s']:.1f} s; written to {out}", flush=True)
    print(md)
    if record["failures"]:
        print("FAILURES:\n  " + "\n  ".join(record["failures"]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
