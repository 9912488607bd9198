#!/usr/bin/env bash
# GPU check, run on a lent NVIDIA machine with a binary built elsewhere (nothing is compiled here):
#   carry devbin/ (mvlt.gz: `cargo build --release --features cuda`, gzipped to fit the transfer) and
#   .devfix/ (copies of the shared reference fixtures), then: bash scripts/gpu_check.sh
# 1. parity on CUDA against the reference fixtures (mvlt verify);
# 2. a few hundred pvlt_tiny pre-training steps at 256 px on the synthetic catalogue, f32 and bf16,
#    samples/s and peak GPU memory; then the same steps in PyTorch (scripts/torch_train_bench.py);
# 3. with the time left before DEADLINE seconds: a long micro-PVLT pre-training run on the full
#    synthetic captions (does ITM learn there with more compute?). The first GPU session ran
#    ITM experiments of scripts/grounding_experiment.py here instead (its docstring has them).
# The device tool returns at most 8 files from $OUT, so the runs live in $RUNS and only a log and
# the metric files are copied to $OUT. For a dry run on a CPU:
#   DEV=cpu STEPS=2 BATCH=2 TORCH_ARGS=--small DEADLINE=150 B=target/release/mvlt bash scripts/gpu_check.sh
# The same kernels and backward rules as CUDA (burn-cubecl), without a GPU, through burn's WGPU
# backend on Mesa's software Vulkan driver (`apt-get install mesa-vulkan-drivers`; src/device.rs):
#   cargo build --release --features wgpu
#   DEV=wgpu STEPS=2 BATCH=2 TORCH_ARGS=--small DEADLINE=0 B=target/release/mvlt bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/mvlt-gpu}; RUNS=${RUNS:-/tmp/mvlt-gpu-runs}; mkdir -p "$OUT" "$RUNS"
B=${B:-./devbin/mvlt}; F=${F:-.devfix}; DEV=${DEV:-cuda}; PY=${PY:-python3}
# gunzip gives the file the archive's mode (not executable): without the chmod every command fails.
if [ "$B" = ./devbin/mvlt ] && [ ! -x "$B" ]; then gunzip -kf devbin/mvlt.gz && chmod +x "$B" || exit 1; fi
DEADLINE=${DEADLINE:-540}; STEPS=${STEPS:-200}; BATCH=${BATCH:-32}
START=$SECONDS
left() { echo $(( DEADLINE - (SECONDS - START) )); }
stage() { echo; echo "== [t=$((SECONDS - START)) s] $*"; }

main() {
stage "machine"
if [ "$DEV" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # cudarc loads the driver and NVRTC at run time. The driver's folder goes first: some toolkit and
  # wheel folders hold a stub libcuda that fails with CUDA_ERROR_STUB_LIBRARY.
  drv=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
  nvrtc=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so*' -not -path '*stubs*' -printf '%h\n' 2>/dev/null | sort -u | head -1)
  echo "driver: $drv; nvrtc: $nvrtc"
  export LD_LIBRARY_PATH="$(dirname "${drv:-/usr/lib/x}"):${nvrtc}:${LD_LIBRARY_PATH:-}"
fi
nproc; $PY -c "import torch; print('torch', torch.__version__)" || true

stage "verify on $DEV"
timeout 90 $B verify $F/small_io.json --device $DEV
timeout 60 $B verify $F/small_e2e_256.json --config $F/small_io.json --weights $F/small_model.safetensors \
   --image-tensor $F/image_preproc.safetensors:02_dress_striped_navy_256x256/tensor_u8 --device $DEV
timeout 60 $B verify $F/pvt_partial_load.json --config $F/small_io.json --weights $F/small_model.safetensors \
   --inputs $F/small_io.safetensors --device $DEV

stage "verify --train-step on $DEV (one pre-training step and its AdamW update: tests/data/train_step)"
timeout 120 $B verify --train-step tests/data/train_step/step.safetensors --weights tests/data/train_step/weights.safetensors \
   --config tests/data/train_step/config.json --device $DEV 2>&1 | tail -4

# Training: pvlt_tiny pre-training steps at 256 px on the synthetic catalogue (the reference's
# recipe with one micro-batch per step) with the GPU's memory sampled every second.
precs="f32 bf16"; [ "$DEV" = wgpu ] && precs=f32   # WGSL has no bf16
for prec in $precs; do
  stage "mvlt pretrain, pvlt_tiny 256 px, batch $BATCH, $STEPS steps, $prec"
  run="$RUNS/train_$prec"
  if [ "$DEV" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -l 1 > "$run.mem" &
    smi=$!
  fi
  timeout 150 $B pretrain --recipe pretrain --device $DEV --precision $prec --out "$run" \
    --set batch_size=$BATCH --set accum_steps=1 --set max_steps=$STEPS --set synthetic_images=2000 \
    --set val_fraction=0 --set log_every=10 --set workers=12 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -4
  [ "$DEV" = cuda ] && { kill $smi; echo "$prec: peak GPU memory $(sort -n "$run.mem" | tail -1) MiB"; }
  # Steady state: the mean rate over the second half of the metric lines.
  $PY -c "import json; r=[json.loads(l) for l in open('$run/metrics.jsonl') if '\"train\"' in l]; h=r[len(r)//2:]; print('$prec: mvlt', round(sum(x['samples_per_s'] for x in h)/len(h),2), 'samples/s over steps', h[0]['step'], '-', r[-1]['step'], '; loss', round(r[0]['loss'],4), '->', round(r[-1]['loss'],4))"
  cp "$run/metrics.jsonl" "$OUT/train_${prec}_metrics.jsonl"
done
[ -f "$RUNS/train_f32/loss.png" ] && cp "$RUNS/train_f32/loss.png" "$OUT/train_f32_loss.png"

if $PY -c "import torch" 2>/dev/null; then
  stage "PyTorch, the same steps (compute only, random inputs)"
  for amp in none bf16 fp16; do
    # The same MLM decoder size as the mvlt runs (the synthetic catalogue's vocabulary).
    (cd scripts && timeout 60 $PY torch_train_bench.py ../$F --device $DEV --batch $BATCH --steps 50 --amp $amp ${TORCH_ARGS:-} \
      --vocab-size "$(wc -l < "$RUNS/train_f32/synthetic/vocab.txt")")
  done
fi

# The LibTorch backend on CUDA: a binary built on the CPU machine with `--features tch` against pip's
# torch==2.11.0 (this machine's version; `scripts/setup-libtorch.sh --torch 2.11.0` sets
# LIBTORCH_BYPASS_VERSION_CHECK=1), carried gzipped as devbin/mvlt-tch.gz, and run against this
# machine's own torch/lib (a libtorch is far too big to carry).
BT=${BT:-./devbin/mvlt-tch}
if [ "$DEV" = cuda ] && { [ -x "$BT" ] || [ -f "$BT.gz" ]; }; then
  [ -x "$BT" ] || { gunzip -kf "$BT.gz" && chmod +x "$BT"; }
  TORCH_LIB=$($PY -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
  export LD_LIBRARY_PATH="$TORCH_LIB:$LD_LIBRARY_PATH"
  stage "LibTorch backend: info and the reference fixtures on cuda (f32, TF32 off)"
  $BT info
  timeout 90 $BT --backend tch verify $F/small_io.json --device cuda
  timeout 60 $BT --backend tch verify $F/small_e2e_256.json --config $F/small_io.json --weights $F/small_model.safetensors \
     --image-tensor $F/image_preproc.safetensors:02_dress_striped_navy_256x256/tensor_u8 --device cuda
  timeout 120 $BT --backend tch verify --train-step tests/data/train_step/step.safetensors \
     --weights tests/data/train_step/weights.safetensors --config tests/data/train_step/config.json --device cuda 2>&1 | tail -3
  for prec in f32 bf16; do
    stage "LibTorch backend: mvlt pretrain, pvlt_tiny 256 px, batch $BATCH, $STEPS steps, $prec"
    run="$RUNS/tch_$prec"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -l 1 > "$run.mem" &
    smi=$!
    timeout 150 $BT --backend tch pretrain --recipe pretrain --device cuda --precision $prec --out "$run" \
      --set batch_size=$BATCH --set accum_steps=1 --set max_steps=$STEPS --set synthetic_images=2000 \
      --set val_fraction=0 --set log_every=10 --set workers=12 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -2
    kill $smi; echo "tch $prec: peak GPU memory $(sort -n "$run.mem" | tail -1) MiB"
    $PY -c "import json; r=[json.loads(l) for l in open('$run/metrics.jsonl') if '\"train\"' in l]; h=r[len(r)//2:]; print('tch $prec: mvlt', round(sum(x['samples_per_s'] for x in h)/len(h),2), 'samples/s')"
  done
  stage "LibTorch backend: mvlt bench --compare-pytorch --device cuda --quick"
  VIRTUAL_ENV= timeout 240 $BT bench --compare-pytorch --quick --device cuda --python "$PY" --fixtures "$F" \
    --json "$OUT/bench_cuda.json" 2>&1 | tail -12
fi

# With the time left: the micro PVLT (its init scales, README Training) on the synthetic catalogue's
# full captions, batch 128, as long as the deadline allows: does ITM leave ln 2 on full captions
# with GPU-sized compute? (On 2 CPU cores it stays at ln 2 for 1000 steps.)
t=$(( $(left) - 15 ))
if [ $t -ge 60 ]; then
  stage "mvlt pretrain, micro, full captions, batch 128, for $t s"
  run="$RUNS/long"
  timeout $t $B pretrain --device $DEV --out "$run" --set batch_size=128 --set base_lr=1.2e-3 \
    --set warmup_epochs=0.1 --set epochs=2000 --set val_every=200 --set checkpoint_every=1000 \
    --set log_every=20 --set workers=8 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | grep -v '^validation' | tail -3
  grep '"val"' "$run/metrics.jsonl" | tail -3
  cp "$run/metrics.jsonl" "$OUT/long_metrics.jsonl"
  cp "$run/loss.png" "$OUT/long_loss.png"
  cp "$run/val.png" "$OUT/long_val.png"
fi
stage "done"
}
main 2>&1 | tee "$OUT/log.txt"
