#!/usr/bin/env bash
# All-reduce bandwidth on this machine, 2 ranks on loopback (Gloo, CPU tensors): mvlt's c10d bridge
# and PyTorch's own torch.distributed, one after the other in this invocation, with the ratio.
#
#   eval "$(scripts/setup-libtorch.sh)" && cargo build --release --features tch
#   scripts/bench-all-reduce.sh [MiB, default 64] [iterations, default 10]
#
# Each side prints one JSON line (rank 0); figures are medians over the iterations.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mib="${1:-64}"
iters="${2:-10}"
mvlt="${MVLT_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/mvlt}"
[ -x "$mvlt" ] || { echo "bench-all-reduce: no $mvlt (cargo build --release --features tch)" >&2; exit 1; }
command -v torchrun >/dev/null || { echo "bench-all-reduce: no torchrun on PATH (eval \"\$(scripts/setup-libtorch.sh)\")" >&2; exit 1; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
launch() { OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --nnodes 1 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$(port)" "$@" 2>/dev/null; }

ours="$(launch --no-python "$mvlt" bench-all-reduce --mb "$mib" --iters "$iters" | grep '^{')"
theirs="$(launch --no-python python3 "$root/scripts/torch_all_reduce.py" "$mib" "$iters" | grep '^{')"
echo "$ours"
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"mvlt / torch.distributed bandwidth: {a['algbw_gb_s'] / b['algbw_gb_s']:.2f} "
      f"({a['algbw_gb_s']:.2f} against {b['algbw_gb_s']:.2f} GB/s, {a['mib']} MiB, {a['ranks']} ranks)")
PY
