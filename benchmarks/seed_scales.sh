#!/usr/bin/env bash
# Seed quality against make_seeds' scales, on classifiers the chain benchmark already trained: for each
# variant and seed, make_seeds with `seeds.scales` replaced, then eval_seeds, refine_crf and eval_pseudo.
# The default [1.0, 0.5, 1.5, 2.0] rows are the chain's own (results/chain.csv).
#
#   bash benchmarks/seed_scales.sh [CHAIN_WORK] [OUT]   (defaults: outputs/benchmarks/chain /tmp/seed_scales)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=${1:-outputs/benchmarks/chain}
dest=${2:-/tmp/seed_scales}
for variant in "b:[1.0, 0.5, 1.5]" "d:[1.0, 2.0]"; do
  name=${variant%%:*}; scales=${variant#*:}
  for seed in 0 1 2; do
    ws=$work/cpal_seed$seed
    out=$dest/$name/seed$seed; mkdir -p "$out"
    python - "$ws/outputs/params.snakemake.yaml" "$out/params.yaml" "$scales" <<'PY'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1])); p["seeds"]["scales"] = yaml.safe_load(sys.argv[3])
yaml.safe_dump(p, open(sys.argv[2], "w"), sort_keys=False)
PY
    data=$ws/data/embedded
    python -m stages.make_seeds --params "$out/params.yaml" --data "$data" --checkpoint "$ws/outputs/train_cls/model.pt" \
      --out "$out/maps" --timing "$out/timing.json" --log "$out/make_seeds.log" > /dev/null 2>&1
    python -m stages.eval_seeds --params "$out/params.yaml" --data "$data" --seeds "$out/maps" \
      --metrics "$out/eval_seeds.json" --curve "$out/curve.csv" --plot "$out/curve.png" --log "$out/eval_seeds.log" >/dev/null 2>&1
    python -m stages.refine_crf --params "$out/params.yaml" --data "$data" --seeds "$out/maps" --out "$out/crf" \
      --workers 2 --timing "$out/crf_timing.json" --log "$out/crf.log" >/dev/null 2>&1
    python -m stages.eval_pseudo --params "$out/params.yaml" --data "$data" --pseudo "$out/crf" --label crf \
      --metrics "$out/eval_crf.json" --log "$out/eval_crf.log" >/dev/null 2>&1
    echo "$name seed$seed $(grep -h 'images in' "$out/make_seeds.log" | tail -1 | cut -c1-120)"
    grep -h "mIoU" "$out/eval_seeds.log" "$out/eval_crf.log" | sed 's/.*INFO //' | head -4
  done
done
