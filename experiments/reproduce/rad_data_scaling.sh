#!/usr/bin/env bash
# RAD Table 2: data scaling on MVTec-AD, fraction tau of the normal training images in the memory.
#   experiments/reproduce/rad_data_scaling.sh [OUT] [extra overrides]
# The keys are variables because they belong to RAD's memory config:
#   FRACTION_KEY     fraction tau of each category's normal images kept in the memory (seeded draw);
#   SINGLE_CLASS     override(s) that give each category its own memory (the per-category protocol);
#   INCREMENTAL_KEY  fraction of the new class only (set it to run the incremental-class setting: memory of
#                    carpet, metal_nut, toothbrush, leather in full plus tau of transistor, tested on transistor).
set -euo pipefail
OUT=${1:-logs/reproduce/rad_data_scaling}
shift || true
FRACTION_KEY=${FRACTION_KEY:-memory.train_fraction}
SINGLE_CLASS=${SINGLE_CLASS:-memory.per_category=true}
INCREMENTAL_KEY=${INCREMENTAL_KEY:-}

python -m anomret.train -m +experiment=rad_mvtec ${SINGLE_CLASS} "${FRACTION_KEY}=0.05,0.2,0.4,0.8,1.0" \
  "hydra.sweep.dir=${OUT}/single_class" "$@"
python -m anomret.train -m +experiment=rad_mvtec "${FRACTION_KEY}=0.05,0.1,0.2,0.4,0.8,1.0" \
  "hydra.sweep.dir=${OUT}/multi_class" "$@"
python -m anomret.report "${OUT}/single_class"
python -m anomret.report "${OUT}/multi_class"
if [[ -n "${INCREMENTAL_KEY}" ]]; then
  python -m anomret.train -m +experiment=rad_mvtec \
    "dataset.categories=[carpet,metal_nut,toothbrush,leather,transistor]" \
    "${INCREMENTAL_KEY}=0.01,0.02,0.1,0.2,0.8,1.0" "hydra.sweep.dir=${OUT}/incremental_class" "$@"
  # The table reads the transistor rows of report_per_category.md.
  python -m anomret.report "${OUT}/incremental_class" --per-category
fi
