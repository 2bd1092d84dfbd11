#!/usr/bin/env bash
# Set up (once) and run the whole pipeline on the embedded default with Snakemake.
# Extra arguments go to snakemake, e.g. `bash run.sh --configfile configs/tiny.yaml`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/setup.sh"
start=$(date +%s)
snakemake --cores "${CORES:-2}" "$@"
echo
echo "Pipeline finished in $(( $(date +%s) - start )) s. Results: $ROOT/results/ (tables and figures),"
echo "stage logs: $ROOT/outputs/logs/, dataset and artifacts: $ROOT/data/ and $ROOT/outputs/."
ls -1 "$ROOT/results"
