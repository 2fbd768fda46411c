#!/usr/bin/env bash
# One device-tool call's worth of GPU work, in stages: bash experiments/gpu_session.sh STAGE...
#   env            versions, GPU, flax present (installs the carried .whl_flax wheels if not)
#   anchors        put the carried diffusers 0.35.2 wheel (and its few needs) on PYTHONPATH
#   tests          pytest -m gpu (every kernel's GPU path, and the HLO custom-call checks);
#                  $TESTS_FILES and $TESTS_K (a -k expression) narrow it; $TESTS_PROCS > 1 runs
#                  that many pytest-xdist processes, each capped to its share of the card's
#                  memory (unshared, eight ran out of it together: BUILD.md, version matrix)
#   generate       experiments.generate at 512x512, 20 steps, fp16, kernels auto
#   ablation       experiments.ablation sd15 fp16 with the anchors (extra flags: $ABLATION_ARGS)
#   spread         experiments.autotune_spread: $SPREAD_TRIALS (4) fresh processes' own
#                  autotuning and UNet step, then the fastest and slowest picks pinned
#   ablation_bf16  the same in bfloat16 ($BF16_ARGS, default: no anchors)
#   ablation_sd21  SD2.1 768x768 fp16, every row, with the anchors ($SD21_ARGS)
#   throughput     experiments.benchmark images/s per batch ($THROUGHPUT_BATCHES, default 1,4,8,16)
#   hopper         the Hopper attention kernel: its GPU tests (stop here if one fails), then its
#                  block-size sweep on $HOPPER_SHAPES, extra flags $HOPPER_ARGS (e.g.
#                  --hopper_half_exp); the tuning table is copied to results
#   attention      experiments.bench_attention on $ATTENTION_SHAPES (default: SD2.1's smaller ones),
#                  implementations $ATTENTION_IMPLS (default: all but jax_mosaic_fa3)
#   autotune       experiments.make_autotune from the committed benches and the newest
#                  attention and norm benches of this call ($OUT); the table is copied to results
#   gn             experiments.bench_norm: GroupNorm at $GN_SHAPES (default: the UNet's), ours
#                  against XLA, and the block/plan sweep ($GN_PLANS, default split,fused) by device
#                  kernel time within $GN_BUDGET s; updates custom_calls/tuning/group_norm.json
#                  (copied to results), which later stages of the call then use
#   ln             experiments.bench_norm: XLA's LayerNorm against our kernel's fastest config
#                  (a small block grid) by device kernel time on $LN_SHAPES (default: SD1.5's four)
#   geglu          experiments.bench_norm: the GEGLU kernels (Triton, Hopper) against XLA, by
#                  device kernel time, and the Triton block sweep on $GEGLU_SHAPES (default:
#                  SD1.5's four), within $GEGLU_BUDGET seconds; extra flags $GEGLU_ARGS
#   ln_geglu       experiments.bench_norm: the LayerNorm before the GEGLU apart (XLA's, then our
#                  Hopper GEGLU) and folded into our Hopper GEGLU, by device kernel time, at
#                  $LN_GEGLU_SHAPES (default: SD1.5's 64x64, 32x32 and 16x16 levels); extra flags
#                  $LN_GEGLU_ARGS (e.g. --ln_geglu_ablate store,stats,store+stats)
#   conv           experiments/bench_conv.py: the UNet's 3x3 convs as cuDNN, taps and im2col
#                  ($CONV_SHAPES, default all; extra flags $CONV_ARGS, e.g. --chain)
#   concat         experiments/bench_concat.py: the skip concatenates written or not
#   upsample       experiments/bench_upsample.py: the subpixel interleave, XLA's fusion against our
#                  kernel, by device kernel time ($UPSAMPLE_ARGS, default --interleave_only)
#   ncu            Nsight Compute on experiments/ncu_probe.py ($NCU_OPS, default all): per kernel
#                  speed of light, pipe utilization, warp stall reasons, memory and occupancy, as
#                  text (ncu_report.txt; $NCU_ARGS adds options, e.g. --section SourceCounters)
#   ptxas          ptxas's verbose output and the SASS of experiments/ncu_probe.py's ops ($PTXAS_OPS,
#                  default the Hopper attention and GEGLU at 64x64), one process per op with
#                  Mosaic GPU's dump switches on, then experiments/ptxas_report.py over the dumps
#                  (no SASS: the machine has no nvdisasm; `ncu_source` shows the SASS)
#   ncu_source     Nsight Compute's per-instruction warp stall samples (SourceCounters) of one
#                  launch of each of $NCU_SOURCE_OPS (default the Hopper attention and GEGLU at
#                  64x64; $NCU_SOURCE_LAUNCHES launches of our kernels per op, default 1), as SASS
#                  with samples (CSV), summarized by experiments/ncu_source_report.py
#   ablate_activation  experiments/ablate_activation.py: the GEGLU and GroupNorm kernels with
#                  each form of their activations, side by side by device kernel time
#                  ($ABLATE_ACTIVATION_ARGS)
#   ablate_attention  experiments/ablate_attention.py: the Hopper attention kernel with stages
#                  left out, and its correct alternatives, by device kernel time ($ABLATE_ARGS)
#   trace          experiments.trace_generate: one traced `generate` per mode, with command
#                  buffers kept on while tracing ($TRACE_ARGS)
#   launch         experiments.launch_probe: what a program's call costs before its kernels,
#                  same input or fresh, command buffers on and off ($LAUNCH_ARGS)
#   profile        experiments.profile: GPU time per kernel kind of a UNet step, of a step inside
#                  the denoising scan, and of the VAE decode; the optimized HLO of each program.
#                  Command buffers off, so that every kernel is attributed to its HLO instruction.
# A stage runs under `timeout` of $TIMEOUT_<stage> or else $STAGE_TIMEOUT seconds, when set (a
# call's limit is hard). pytest reads extra options from $PYTEST_ADDOPTS (e.g. -k to select).
# Results: the scripts write to /tmp/res (bench_norm's files get the stage's name); after every
# stage, $OUT/results.tgz is rebuilt from it
# (the device tool brings back few files, and a call cut at its limit keeps the stages done).
set -u -o pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SDJAX_CACHE_DIR=/tmp/sdjax_cache
# What an earlier invocation in the same call installed (`env`'s flax, `anchors`' diffusers)
# stays on the path: a call that runs `env anchors` and then `ablation` as two invocations
# otherwise times the rows without their anchors (results README, twentieth session, call 2).
for site in /tmp/flax_site /tmp/anchor_site; do
  [ -d "$site" ] && export PYTHONPATH=$PYTHONPATH:$site
done
FINAL_OUT=${OUT:-/tmp/out}
export OUT=/tmp/res
mkdir -p "$FINAL_OUT" "$OUT"
# The whole console output also comes back as a file (the tool returns only its tail).
exec > >(tee -a "$FINAL_OUT/session.log") 2>&1
status=0
limit() { if [ -n "$stage_timeout" ]; then timeout "$stage_timeout" "$@"; else "$@"; fi; }
quiet() { grep -v "^I[0-9]"; }
for stage in "$@"; do
  var="TIMEOUT_$stage"
  stage_timeout=${!var:-${STAGE_TIMEOUT:-}}
  echo "=== $stage $(date +%T)${stage_timeout:+ (limit ${stage_timeout} s)}"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c "import flax" 2>/dev/null || {
        python3 -m pip install -q --no-index --no-deps --target /tmp/flax_site .whl_flax/*.whl
        export PYTHONPATH=$PYTHONPATH:/tmp/flax_site; echo "installed carried flax"; }
      python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
      ;;
    anchors)
      python3 -m pip install -q --no-index --no-deps --target /tmp/anchor_site .whl/*.whl
      export PYTHONPATH=$PYTHONPATH:/tmp/anchor_site
      python3 -c "import diffusers; print('diffusers', diffusers.__version__)"
      ;;
    spread)
      limit python3 -m experiments.autotune_spread --config sd15 --dtype float16 \
        --trials ${SPREAD_TRIALS:-4} --repeats ${SPREAD_REPEATS:-5} ${SPREAD_ARGS:-} 2>&1 | quiet | grep -v "^W" | tail -30 || status=1
      ;;
    tests)
      procs=${TESTS_PROCS:-1}; xdist=()
      [ "$procs" -gt 1 ] && xdist=(-n "$procs" -p xdist)
      (
        if [ "$procs" -gt 1 ]; then  # a share of the card each, 10% left for the CUDA contexts
          export XLA_PYTHON_CLIENT_PREALLOCATE=false
          export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $procs, 3))")
        fi
        limit python3 -m pytest -q -m gpu "${xdist[@]}" ${TESTS_FILES:-tests/test_attention_kernels.py tests/test_flash_hopper.py tests/test_geglu_hopper.py tests/test_norm_kernels.py tests/test_ops.py tests/test_subpixel.py} \
          ${TESTS_K:+-k "$TESTS_K"}
      ) 2>&1 | tail -15 || status=1
      ;;
    hopper)
      if limit python3 -m pytest -q -x -m gpu tests/test_flash_hopper.py 2>&1 | tail -25; then
        limit python3 experiments/tune_attention.py --kernels flash_hopper --budget_s ${HOPPER_BUDGET:-200} \
          --shapes ${HOPPER_SHAPES:-sd15_self_64,sd21_self_96,sd21_self_48,sd15_self_32,sd15_self_16} ${HOPPER_ARGS:-} 2>&1 | quiet | tail -12 || status=1
        cp custom_calls/tuning/attention.json "$OUT/attention_tuning.json"
      else status=1; fi
      ;;
    generate)
      limit python3 -m experiments.generate --steps 20 --height 512 --width 512 --dtype float16 --kernels auto \
        --noprogress --repeat 3 --out "$OUT/generate" 2>&1 | quiet | tail -25 || status=1
      ;;
    ablation)
      limit python3 -m experiments.ablation --config sd15 --dtype float16 --repeats 3 ${ABLATION_ARGS:-} 2>&1 | quiet | tail -40 || status=1
      ;;
    ablation_bf16)
      limit python3 -m experiments.ablation --config sd15 --dtype bfloat16 --repeats 3 ${BF16_ARGS:---noanchors} 2>&1 | quiet | tail -30 || status=1
      ;;
    ablation_sd21)
      limit python3 -m experiments.ablation --config sd21 --dtype float16 --repeats 3 ${SD21_ARGS:-} 2>&1 | quiet | tail -30 || status=1
      ;;
    throughput)
      limit python3 -m experiments.benchmark --kernels auto --batch_sizes ${THROUGHPUT_BATCHES:-1,4,8,16} 2>&1 | quiet | tail -20 || status=1
      ;;
    attention)
      limit python3 experiments/bench_attention.py --calls 20 --repeats 5 ${ATTENTION_IMPLS:+--impls $ATTENTION_IMPLS} \
        --shapes ${ATTENTION_SHAPES:-sd21_self_48,sd21_cross_48,sd21_self_24,sd21_cross_24,sd21_self_12,sd21_cross_12} 2>&1 | tail -12 || status=1
      ;;
    autotune)
      r=experiments/results
      latest=$(ls -t "$OUT"/bench_attention_*.json 2>/dev/null | head -1)
      latest_norm=$(ls -t "$OUT"/bench_norm_*.json 2>/dev/null | head -1)
      python3 -m experiments.make_autotune \
        --attention $r/bench_attention_NVIDIA_H100_80GB_HBM3_2026-11-25_fp16_runa.json,$r/bench_attention_NVIDIA_H100_80GB_HBM3_2026-11-25_fp16_runb.json,$r/bench_attention_NVIDIA_H100_80GB_HBM3_2026-11-25_fp16_s3.json,$r/bench_attention_NVIDIA_H100_80GB_HBM3_2026-11-25_fp16_s4.json,$r/bench_attention_NVIDIA_H100_80GB_HBM3_float16_2026-11-25_s5.json,$r/bench_attention_NVIDIA_H100_80GB_HBM3_float16_2026-11-26_s6.json,$r/bench_attention_float16_H100_jax0.11.2_2026-11-26_s14g_kernel_us.json${latest:+,$latest} \
        --norm $r/bench_norm_NVIDIA_H100_80GB_HBM3_float16_2026-11-25.json,$r/bench_norm_NVIDIA_H100_80GB_HBM3_float16_2026-11-25_s4_gn.json,$r/bench_norm_NVIDIA_H100_80GB_HBM3_float16_2026-11-25_s5_gn.json,$r/bench_norm_NVIDIA_H100_80GB_HBM3_float16_2026-11-25_s5b_gn.json,$r/bench_norm_NVIDIA_H100_80GB_HBM3_float16_2026-11-26_s5c_geglu.json,$r/bench_norm_NVIDIA_H100_80GB_HBM3_float16_2026-11-26_s6_vae_gn.json,$r/bench_norm_NVIDIA_H100_80GB_HBM3_float16_2026-11-26_s9e_geglu.json,$r/bench_norm_NVIDIA_H100_80GB_HBM3_float16_2026-11-26_s12a_geglu16.json${latest_norm:+,$latest_norm} 2>&1 | tail -3 || status=1
      cp sdjax/assets/autotune.json "$OUT/autotune.json"
      ;;
    gn)
      g=${GN_SHAPES:-unet_64x64x320,unet_attn_64x64x320,unet_64x64x640,unet_64x64x960,unet_32x32x640,unet_32x32x1280,unet_32x32x960,unet_32x32x1920,unet_32x32x320,unet_attn_32x32x640,unet_16x16x1280,unet_16x16x2560,unet_16x16x1920,unet_16x16x640,unet_attn_16x16x1280,unet_8x8x1280,unet_8x8x2560,unet_attn_8x8x1280}
      limit python3 experiments/bench_norm.py --gn_shapes $g --geglu_shapes sd15_8 --sweep $g \
        --sweep_plans ${GN_PLANS:-split,fused} --calls ${GN_CALLS:-8} --repeats 5 --budget_s ${GN_BUDGET:-150} 2>&1 | quiet | tail -40 || status=1
      cp custom_calls/tuning/group_norm.json "$OUT/group_norm_tuning.json" 2>/dev/null
      ;;
    ln)
      limit python3 experiments/bench_norm.py --gn_shapes unet_8x8x1280 --geglu_shapes sd15_8 \
        --ln_shapes ${LN_SHAPES:-sd15_64,sd15_32,sd15_16,sd15_8} --calls 8 --repeats 5 \
        --budget_s ${LN_BUDGET:-150} 2>&1 | quiet | tail -20 || status=1
      ;;
    geglu)
      g=${GEGLU_SHAPES:-sd15_64,sd15_32,sd15_16,sd15_8}
      limit python3 experiments/bench_norm.py --gn_shapes unet_64x64x320 --geglu_shapes $g \
        --sweep_geglu $g --budget_s ${GEGLU_BUDGET:-100} ${GEGLU_ARGS:-} 2>&1 | quiet | tail -30 || status=1
      ;;
    ln_geglu)
      limit python3 experiments/bench_norm.py --gn_shapes unet_32x32x320 --geglu_shapes sd15_8 \
        --ln_geglu_shapes ${LN_GEGLU_SHAPES:-sd15_64,sd15_32,sd15_16} ${LN_GEGLU_ARGS:-} 2>&1 | quiet | tail -12 || status=1
      ;;
    conv)
      limit python3 experiments/bench_conv.py ${CONV_SHAPES:+--shapes $CONV_SHAPES} $CONV_ARGS 2>&1 | quiet | tail -14 || status=1
      ;;
    concat)
      limit python3 experiments/bench_concat.py 2>&1 | quiet | tail -14 || status=1
      ;;
    upsample)
      limit python3 experiments/bench_upsample.py ${UPSAMPLE_ARGS:---interleave_only} 2>&1 | quiet | tail -14 || status=1
      ;;
    ncu)
      ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" XLA_PYTHON_CLIENT_PREALLOCATE=false \
        limit "$ncu_bin" --clock-control none --kernel-name regex:sdjax_ \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats \
        --section InstructionStats ${NCU_ARGS:-} \
        python3 experiments/ncu_probe.py ${NCU_OPS:+--ops $NCU_OPS} > "$OUT/ncu_report.txt" 2>&1 || status=1
      grep -E "relative error|==PROF==|==ERROR==|==WARNING==" "$OUT/ncu_report.txt" | head -20
      ;;
    ptxas)
      dirs=""
      for op in $(echo "${PTXAS_OPS:-attention_64,geglu_64_hopper}" | tr , ' '); do
        d="$OUT/mosaic_dump/$op"; mkdir -p "$d"; dirs="$dirs${dirs:+,}$d"
        MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO="$d" \
          limit python3 experiments/ncu_probe.py --ops "$op" > "$d/stdout.txt" 2>&1 || status=1
        grep -E "relative error" "$d/stdout.txt"
        rm -f "$d"/*.mlir-passes.log  # tens of MB each
      done
      limit python3 experiments/ptxas_report.py --dump_dirs "$dirs" 2>&1 | quiet | tail -30 || status=1
      ;;
    ncu_source)
      ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      for op in $(echo "${NCU_SOURCE_OPS:-attention_64,geglu_64_hopper}" | tr , ' '); do
        XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" XLA_PYTHON_CLIENT_PREALLOCATE=false \
          limit "$ncu_bin" --clock-control none --kernel-name regex:sdjax_ --launch-count ${NCU_SOURCE_LAUNCHES:-1} \
          --section SourceCounters --section WarpStateStats -f -o "/tmp/ncu_src_$op" \
          python3 experiments/ncu_probe.py --ops "$op" > "$OUT/ncu_source_$op.log" 2>&1 || status=1
        "$ncu_bin" -i "/tmp/ncu_src_$op.ncu-rep" --page source --csv --print-source sass \
          > "$OUT/ncu_source_$op.csv" 2>&1 || status=1
        "$ncu_bin" -i "/tmp/ncu_src_$op.ncu-rep" --page details \
          > "$OUT/ncu_source_${op}_details.txt" 2>&1 || status=1
        limit python3 experiments/ncu_source_report.py --csv "$OUT/ncu_source_$op.csv" 2>&1 | tail -45 || status=1
      done
      ;;
    ablate_activation)
      limit python3 experiments/ablate_activation.py ${ABLATE_ACTIVATION_ARGS:-} 2>&1 | quiet | tail -45 || status=1
      ;;
    ablate_attention)
      limit python3 experiments/ablate_attention.py ${ABLATE_ARGS:-} 2>&1 | quiet | tail -30 || status=1
      ;;
    trace)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_enable_command_buffers_during_profiling=true" limit python3 -m experiments.trace_generate \
        --config sd15 --dtype float16 --kernels auto ${TRACE_ARGS:-} 2>&1 | quiet | tail -60 || status=1
      ;;
    launch)
      limit python3 -m experiments.launch_probe --config sd15 --dtype float16 --kernels auto \
        ${LAUNCH_ARGS:-} 2>&1 | quiet | tail -60 || status=1
      ;;
    profile)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" limit python3 -m experiments.profile \
        --config sd15 --dtype float16 --kernels auto --dump_hlo ${PROFILE_ARGS:-} 2>&1 | quiet | tail -80 || status=1
      ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
  # bench_norm names its files by date only: the gn, ln and geglu stages of one call would
  # overwrite each other's, so each stage's new files take the stage's name.
  for f in "$OUT"/bench_norm_*_????-??-??.*; do
    [ -e "$f" ] && mv "$f" "${f%.*}_$stage.${f##*.}"
  done
  tar czf "$FINAL_OUT/results.tgz" -C "$OUT" . 2>/dev/null
done
echo "=== done $(date +%T) status $status"
exit $status
