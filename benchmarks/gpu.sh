#!/bin/bash
# The GPU benchmark session: the rows of BENCHMARKS.md's GPU tables, each in
# its own process with a time limit, skipping what would start after DEADLINE
# seconds. Float32 matmuls run as TF32 on both sides (--precision tf32).
# Results: OUTDIR/STEP.json and OUTDIR/gpu.log.
#
#   bash benchmarks/gpu.sh OUTDIR [DEADLINE_S [STEP ...]]   # default: every step, in order
set -u
out=${1:?usage: gpu.sh OUTDIR [DEADLINE_S [STEP ...]]}
deadline=${2:-900}
shift $(($# < 2 ? $# : 2))
only=" $* "
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# Steps share compiled programs through JAX's persistent cache: a vit_h training step is
# slow to compile on an H200, and train_vit_h_bf16_max repeats train_vit_h_bf16's.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/sam_jax_gpu_cache}
start=$SECONDS

limited() {  # limited NAME LIMIT_S COMMAND...: one process, unless past the deadline
  local name=$1 limit=$2; shift 2
  [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
  local left=$((deadline - (SECONDS - start)))
  if ((left < 30)); then echo "## $name: skipped, ${left}s left"; return; fi
  ((limit > left)) && limit=$left
  echo "## $name (limit ${limit}s, at $((SECONDS - start))s)"
  timeout -k 5 "$limit" "$@"
  echo "## $name: exit $? after $((SECONDS - start))s"
}

step() {  # step NAME LIMIT_S ARGS...: a benchmarks.run row, results in OUTDIR/NAME.json
  limited "$1" "$2" python3 -m benchmarks.run --keep-going --precision tf32 \
    --out "$out/$1.json" "${@:3}"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  step enc_vit_h_bf16 90 --only encoder --variants vit_h --dtype bfloat16 --batch 1,8 --repeats 10
  step train_vit_h_bf16 360 --only train --variants vit_h --dtype bfloat16 --train-batch 4 --repeats 3
  step train_vit_h_bf16_b1 300 --only train --variants vit_h --dtype bfloat16 --train-batch 1 --repeats 3
  step train_vit_b_bf16 180 --only train --variants vit_b --dtype bfloat16 --train-batch 4 --repeats 3
  # The largest per-device batch: XLA's compiled memory at 8, 16, ... against
  # 95% of the card (JAX's allocator stops at 75% unless told), then two steps.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 step train_vit_h_bf16_max 540 --only train --variants vit_h \
    --dtype bfloat16 --train-batch 4 --train-batch-max 64 --repeats 2
  # Where the encoder's time goes, by model part (the log has it). Without command
  # buffers: XLA otherwise runs the blocks as one CUDA graph, which the profile sees whole.
  XLA_FLAGS=--xla_gpu_enable_command_buffer= limited profile_enc_vit_h_bf16 180 python3 -m benchmarks.profile_encoder --variant vit_h \
    --dtype bfloat16 --batch 8
  step amg_vit_h 120 --only decoder,amg --variants vit_h --prompts 1 --points-per-side 32 --photos 512x512 --repeats 3
  # The data engine on 4 photos, the paper's settings (32^2 points, 2 crop layers: 21 crops
  # an image), against the reference generator looped over the same files.
  step engine_vit_h 300 --only engine --variants vit_h --points-per-side 32 --crop-n-layers 2 --repeats 1
  step enc_vit_b_bf16 50 --only encoder --variants vit_b --dtype bfloat16 --batch 1,8 --repeats 10
  step enc_vit_h_fp32 60 --only encoder --variants vit_h --batch 1 --repeats 5
  step attn_vit_h_bf16 90 --only attention --variants vit_h --dtype bfloat16 --batch 8
  step dec_vit_h 120 --only decoder,predict --variants vit_h --repeats 5
  step enc_vit_h_bf16_xla 80 --only encoder --variants vit_h --dtype bfloat16 --batch 8 --attention xla --repeats 10
  step enc_vit_b_fp32 50 --only encoder --variants vit_b --batch 1 --repeats 10
  echo "## done after $((SECONDS - start))s"
} 2>&1 | tee "$out/gpu.log"
