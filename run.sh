#!/usr/bin/env bash
# Set up (once) and run the whole pipeline on the embedded default with Snakemake, then print the
# report's table. Extra arguments go to snakemake, e.g. `bash run.sh --configfile configs/tiny.yaml`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/setup.sh"
start=$(date +%s)
snakemake --cores "${CORES:-2}" "$@"
echo
echo "Pipeline finished in $(( $(date +%s) - start )) s. This run's report (results/report.csv):"
echo
python -m cpal.report.summary results/report.csv
echo
echo "Report:     $ROOT/results/report.md (+ report.csv, report_per_class.png, report_grid.png)"
echo "Results:    $ROOT/results/ (eval_*.json, eval_seeds_curve.*, dataset_samples.png; git-ignored, this run's own)"
echo "Logs:       $ROOT/outputs/logs/ (one per stage)"
echo "Artifacts:  $ROOT/data/ (dataset) and $ROOT/outputs/ (models, seeds, masks)"
echo "Reference:  $ROOT/results/reference/ (the committed run the README quotes, to compare with)"
