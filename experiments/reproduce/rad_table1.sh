#!/usr/bin/env bash
# RAD Table 1 (MVTec-AD, VisA, Real-IAD) and Table A3 (3D-ADAM, RGB only): multi-class, training-free.
# Needs the DINOv3 ViT-B/16 weights and the datasets under $ANOMRET_DATA_DIR.
#   experiments/reproduce/rad_table1.sh [OUT] [extra overrides, e.g. trainer=gpu]
set -euo pipefail
OUT=${1:-logs/reproduce/rad_table1}
shift || true
EXPERIMENTS=${EXPERIMENTS:-"rad_mvtec rad_visa rad_realiad rad_3dadam"}

for experiment in $EXPERIMENTS; do
  python -m anomret.train "+experiment=${experiment}" "hydra.run.dir=${OUT}/${experiment}" "$@"
done
# One row per dataset, all seven metrics (mean over categories); per category in report_per_category.md.
python -m anomret.report "${OUT}" --per-category --no-plots
