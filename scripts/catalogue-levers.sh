#!/usr/bin/env bash
# The levers of docs/CATALOGUE.md on a small catalogue of real products: pre-training with the
# demo's catalogue recipe (crates/mvlt/configs/demo-catalogue.toml) and one change each, for the
# same steps, then ITM and the contrastive embeddings on 101-candidate lists of the validation
# products (random negatives, both directions). One table row per lever.
#
#   scripts/catalogue-levers.sh CATALOGUE VOCAB STEPS [LEVER ...]
#
# CATALOGUE: a folder with catalog.jsonl (e.g. the one `mvlt demo --data ... --products 2500`
# writes to OUT/catalog). LEVER: a name from the list below (default: all). Needs a built
# `target/release/mvlt` (the LibTorch build for the figures of the docs).
set -euo pipefail
cat="${1:?catalogue folder}"; vocab="${2:?vocab.txt}"; steps="${3:?steps}"; shift 3
bin="${MVLT_BIN:-target/release/mvlt}"
out="${LEVERS_OUT:-runs/levers}"
mkdir -p "$out"
declare -A LEVERS=(
  [recipe]=""
  [no-augmentation]="augment_min_scale=1 augment_flip=false"
  [hard-negatives]="itm_hard_negatives=true itm_hard_negatives_from_step=$((steps / 2))"
  [no-reconstruction]='objectives=["mlm","itm"]'
  [dropout]="dropout=0.1 drop_path_rate=0.1"
  [smaller-lr]="base_lr=0.004"
  [last-weights]="export_best=false"
  [with-recognition]="with_cls=true"
  [recognition+hard-negatives]="with_cls=true itm_hard_negatives=true itm_hard_negatives_from_step=$((steps / 2))"
  [recognition+no-reconstruction]='with_cls=true objectives=["mlm","itm"]'
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(recipe no-augmentation with-recognition hard-negatives no-reconstruction dropout)
echo "| lever | settings | steps | best val itc_acc (step) | last val itm_acc | ITM R@1 TIR / ITR | embeddings R@1 TIR / ITR | ITM + similarity R@1 TIR / ITR | wall s |"
echo "|---|---|---|---|---|---|---|---|---|"
for name in "${names[@]}"; do
  sets=()
  for s in ${LEVERS[$name]}; do sets+=(--set "$s"); done
  run="$out/$name"
  t0=$(date +%s)
  # LEVERS_KEEP=1: a lever whose run and evaluation are already there is only tabulated.
  if [ "${LEVERS_KEEP:-0}" = 1 ] && [ -f "$run/itr.json" ]; then
    wall=$(cat "$run.wall" 2>/dev/null || echo "-")
  else
  rm -rf "$run"
  "$bin" pretrain --recipe demo-catalogue --data "$cat" --vocab "$vocab" --out "$run" --max-steps "$steps" \
    --set val_fraction=0.1 "${sets[@]}" >"$run.log" 2>&1 || { echo "| $name | failed: see $run.log |"; continue; }
  for d in tir itr; do
    "$bin" eval retrieval --weights "$run/final/model.safetensors" --data "$cat" --direction $d --val-fraction 0.1 \
      --seed 0 --queries 100 --candidates 101 --rerank 10 --json "$run/$d.json" >>"$run.log" 2>&1
  done
  wall=$(( $(date +%s) - t0 ))
  echo "$wall" >"$run.wall"
  fi
  python3 - "$run" "$name" "${LEVERS[$name]:-(the recipe)}" "$steps" "$wall" <<'PY'
import json, sys
run, name, sets, steps, wall = sys.argv[1:]
vals = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"val"' in l]
best = max(vals, key=lambda v: v.get("itc_acc", 0))
r = {d: json.load(open(f"{run}/{d}.json")) for d in ("tir", "itr")}
pct = lambda x: f"{100 * x:.0f}"
print(f"| {name} | `{sets}` | {steps} | {best.get('itc_acc', 0):.3f} ({best['step']}) | {vals[-1].get('itm_acc', 0):.3f} "
      f"| {pct(r['tir']['r@1'])} / {pct(r['itr']['r@1'])} "
      f"| {pct(r['tir']['first_stage']['first_stage']['r@1'])} / {pct(r['itr']['first_stage']['first_stage']['r@1'])} "
      f"| {pct(r['tir']['first_stage']['itm_plus_similarity']['r@1'])} / {pct(r['itr']['first_stage']['itm_plus_similarity']['r@1'])} | {wall} |")
PY
done
