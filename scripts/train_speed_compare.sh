#!/usr/bin/env bash
# Training speed, mvlt against PyTorch, both in this one invocation on this machine:
# pvlt_tiny, 256 px, T = 128, bert-base-uncased's 30,522-word MLM decoder, MLM + ITM + reconstruction,
# one full step (forward, backward, AdamW) per batch.
#   bash scripts/train_speed_compare.sh [--device cpu|cuda] [--batch 8] [--steps 6] [--precision f32|bf16]
# Needs a release build (cargo build --release [--features cuda]) and python3 with torch and
# safetensors; FIXTURES (default ../shared/fixtures) holds reference/ and vocab/.
set -euo pipefail
DEVICE=cpu; BATCH=8; STEPS=6; PRECISION=f32
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --precision) PRECISION=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
FIX=${FIXTURES:-../shared/fixtures}
BIN=${MVLT:-target/release/mvlt}
RUN=$(mktemp -d)
trap 'rm -rf "$RUN"' EXIT
PY=${PYTHON:-python3}

# mvlt: the reference recipe with one micro-batch per step on a small synthetic catalogue; the rate
# is the mean of the logged steps after the first (which includes start-up).
"$BIN" pretrain --recipe pretrain --device "$DEVICE" --precision "$PRECISION" --out "$RUN/mvlt" \
  --vocab "$FIX/vocab/bert-base-uncased-vocab.txt" \
  --set batch_size="$BATCH" --set accum_steps=1 --set max_steps="$STEPS" --set synthetic_images=$((BATCH * (STEPS + 2))) \
  --set val_fraction=0 --set log_every=1 >/dev/null 2>"$RUN/mvlt.log" || { cat "$RUN/mvlt.log"; exit 1; }
ours=$("$PY" -c "import json; r=[json.loads(l) for l in open('$RUN/mvlt/metrics.jsonl') if '\"train\"' in l][1:]; print(sum(x['samples_per_s'] for x in r)/len(r))")

amp=none
[ "$PRECISION" = bf16 ] && amp=bf16
theirs=$(cd scripts && "$PY" torch_train_bench.py "../$FIX/reference" --device "$DEVICE" --batch "$BATCH" --steps $((STEPS - 2)) --warmup 1 --amp $amp | tail -1)
"$PY" - "$ours" "$theirs" "$DEVICE" "$BATCH" "$PRECISION" <<'EOF'
import json, sys
ours, theirs = float(sys.argv[1]), json.loads(sys.argv[2])
print(f"pvlt_tiny 256 px, batch {sys.argv[4]}, {sys.argv[3]}, {sys.argv[5]}: mvlt {ours:.2f} samples/s, "
      f"PyTorch {theirs['torch']} {theirs['samples_per_s']:.2f} samples/s; mvlt / PyTorch = {ours / theirs['samples_per_s']:.2f}")
EOF
