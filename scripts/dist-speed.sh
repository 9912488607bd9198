#!/usr/bin/env bash
# Training samples/s on this machine for the same run two ways, one after the other in this
# invocation: 1 process accumulating 2 micro-batches, and 2 ranks under torchrun (c10d, Gloo);
# both take the same steps of the same samples.
#
#   eval "$(scripts/setup-libtorch.sh)" && cargo build --release --features tch
#   scripts/dist-speed.sh [steps, default 40] [extra --set arguments...]
#
# The default run is `mvlt pretrain`'s (cpu-pretrain: the micro PVLT at 64 px, batch 8 per
# micro-batch). Figures: samples/s of the run's last 3/4 of training lines (after warm-up), and
# wall time of the whole command.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
steps="${1:-40}"
shift || true
mvlt="${MVLT_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/mvlt}"
[ -x "$mvlt" ] || { echo "dist-speed: no $mvlt (cargo build --release --features tch)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
common=(pretrain --max-steps "$steps" --seed 0 --set log_every=1 --set val_every=100000 --set checkpoint_every=100000 --set synthetic_images=800 "$@")
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# The catalogue once, outside the timing.
MVLT_BACKEND=tch "$mvlt" synth --out "$work/data" --n 800 --size 256 --seed 0 >/dev/null
common+=(--data "$work/data")
timed() { local t0; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; python3 -c "import time; print(f'{time.time() - $t0:.1f}')"; }
rate() { python3 - "$1" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
t = [l["samples_per_s"] for l in lines if l.get("kind") == "train"]
t = t[len(t) // 4:]
print(f"{sum(t) / len(t):.1f}")
PY
}
w1=$(timed env MVLT_BACKEND=tch "$mvlt" "${common[@]}" --out "$work/one" --set accum_steps=2)
w2=$(timed env MVLT_BACKEND=tch OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --rdzv-backend c10d \
    --rdzv-endpoint "127.0.0.1:$(port)" --no-python "$mvlt" "${common[@]}" --out "$work/ranks")
echo "| way | samples/s | wall s ($steps steps) |"
echo "|---|---|---|"
echo "| 1 process, accum_steps = 2 | $(rate "$work/one") | $w1 |"
echo "| 2 ranks (torchrun, Gloo, 1 thread each) | $(rate "$work/ranks") | $w2 |"
