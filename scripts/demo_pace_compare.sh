#!/usr/bin/env bash
# The demo's own pre-training (crates/mvlt/configs/demo.toml: micro PVLT, 64 px, T = 16, batch 64, MLM + ITM +
# reconstruction + ITC, real synthetic catalogue and loader) timed for two or more mvlt binaries in
# one sitting, alternating, so that a machine whose speed drifts affects all alike.
#
#   scripts/demo_pace_compare.sh CATALOG BINARY [BINARY ...]     (ROUNDS=2 STEPS=80 by default)
#
# CATALOG: a synthetic catalogue folder (`mvlt synth`, or a demo's OUT/catalog). Prints per run
# the median of the 10-step windows' samples/s after the first 20 steps (from metrics.jsonl), and
# the cores used (CPU seconds over wall seconds of the whole process, start-up included).
set -euo pipefail
catalog="$1"
shift
rounds="${ROUNDS:-2}"
steps="${STEPS:-80}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for r in $(seq "$rounds"); do
    for bin in "$@"; do
        out="$work/run"
        rm -rf "$out"
        /usr/bin/time -f "%e %U %S" -o "$work/time" "$bin" pretrain --recipe demo --data "$catalog" --out "$out" \
            --set max_steps="$steps" --set val_every=0 --set checkpoint_every=0 --set epochs=1 >/dev/null 2>&1
        read -r wall user sys <"$work/time"
        sps="$(python3 - "$out/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
w = [r["samples_per_s"] for r in rows if r.get("kind") == "train" and r["step"] > 20]
print(f"{statistics.median(w):.1f}")
EOF
)"
        cores="$(python3 -c "print(f'{($user + $sys) / $wall:.2f}')")"
        echo "round $r: $bin: $sps samples/s (median of 10-step windows after step 20), $cores cores, ${wall} s wall"
    done
done
