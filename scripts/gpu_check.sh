#!/usr/bin/env bash
# GPU check, run on a lent NVIDIA machine with a binary built elsewhere (nothing is compiled here):
#   carry devbin/mvlt (cargo build --release --features cuda) and .devfix/ (copies of the shared
#   reference fixtures), then: bash scripts/gpu_check.sh
# Parity on CUDA against the reference fixtures, then forward-pass timings; logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/mvlt-gpu}; mkdir -p "$OUT"
B=./devbin/mvlt; F=.devfix
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# cudarc loads the driver and NVRTC at run time. The driver's folder goes first: some toolkit and
# wheel folders hold a stub libcuda that fails with CUDA_ERROR_STUB_LIBRARY.
drv=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
nvrtc=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so*' -not -path '*stubs*' -printf '%h\n' 2>/dev/null | sort -u | head -1)
echo "driver: $drv; nvrtc: $nvrtc" | tee -a "$OUT/gpu.txt"
export LD_LIBRARY_PATH="$(dirname "${drv:-/usr/lib/x}"):${nvrtc}:${LD_LIBRARY_PATH:-}"
{
  echo "== verify on cuda"
  $B verify $F/small_io.json --device cuda
  $B verify $F/small_e2e_256.json --config $F/small_io.json --weights $F/small_model.safetensors \
     --image-tensor $F/image_preproc.safetensors:02_dress_striped_navy_256x256/tensor_u8 --device cuda
  $B verify $F/pvt_partial_load.json --config $F/small_io.json --weights $F/small_model.safetensors \
     --inputs $F/small_io.safetensors --device cuda
} 2>&1 | tee "$OUT/verify_cuda.txt"
{
  echo "== forward timings (pvlt_tiny, 256x256)"
  for heads in itm all; do
    for batch in 8 64; do
      $B bench --device cuda --config tiny --image-size 256 --batch $batch --heads $heads --warmup 3 --iters 10
    done
  done
  $B bench --device cpu --config tiny --image-size 256 --batch 8 --heads itm --warmup 1 --iters 3
} 2>&1 | tee "$OUT/bench.txt"
# Training: a few hundred pvlt_tiny pre-training steps at 256 px on the synthetic catalogue (the
# reference's recipe with one micro-batch per step), in f32 and bf16, with the GPU's memory sampled
# every second; then the same steps in PyTorch (compute only, random inputs) when torch is there.
# Skip with SKIP_TRAIN=1; STEPS and BATCH change the size.
if [ -z "${SKIP_TRAIN:-}" ]; then
  STEPS=${STEPS:-200}; BATCH=${BATCH:-32}
  for prec in f32 bf16; do
    run="$OUT/train_$prec"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -l 1 > "$run.mem" &
    smi=$!
    $B pretrain --recipe pretrain --device cuda --precision $prec --out "$run" \
      --set batch_size=$BATCH --set accum_steps=1 --set max_steps=$STEPS --set synthetic_images=2000 \
      --set val_fraction=0 --set log_every=10 --set workers=12 2>&1 | tail -5
    kill $smi
    echo "$prec: peak GPU memory $(sort -n "$run.mem" | tail -1) MiB"
    # Steady state: the mean rate of the second half of the metric lines.
    python3 -c "import json,sys; r=[json.loads(l) for l in open('$run/metrics.jsonl') if '\"train\"' in l]; h=r[len(r)//2:]; print('$prec: mvlt', round(sum(x['samples_per_s'] for x in h)/len(h),2), 'samples/s; last loss', round(r[-1]['loss'],4))"
    rm -rf "$run/checkpoints" "$run/synthetic/images"
  done 2>&1 | tee "$OUT/train.txt"
  if python3 -c "import torch" 2>/dev/null; then
    for amp in none fp16 bf16; do
      # The same MLM decoder size as the mvlt runs (the synthetic catalogue's vocabulary).
      (cd scripts && python3 torch_train_bench.py ../$F --device cuda --batch $BATCH --steps 50 --amp $amp \
        --vocab-size "$(wc -l < "$OUT/train_f32/synthetic/vocab.txt")")
    done 2>&1 | tee -a "$OUT/train.txt"
  fi
fi
