#!/usr/bin/env bash
# RAD Table 2: data scaling on MVTec-AD, fraction tau of the normal training images in the memory.
#   experiments/reproduce/rad_data_scaling.sh [OUT] [extra overrides]
# Settings (RAD's memory config, see README "RAD"):
#   FRACTION_KEY  fraction tau of each category's normal images kept in the memory (seeded draw, memory.seed);
#   CATEGORIES    MVTec categories of the single-class setting (one job per category and tau, own memory);
#   NEW_CLASS     the class onboarded in the incremental-class setting (tau of it, the four others whole).
set -euo pipefail
OUT=${1:-logs/reproduce/rad_data_scaling}
shift || true
FRACTION_KEY=${FRACTION_KEY:-memory.fraction}
CATEGORIES=${CATEGORIES:-"bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper"}
NEW_CLASS=${NEW_CLASS:-transistor}

# Single-class: each category with a memory of its own images only; K is capped at that memory's size.
for category in ${CATEGORIES}; do
  python -m anomret.train -m +experiment=rad_mvtec "dataset.categories=[${category}]" retrieval.cap_k=true \
    "${FRACTION_KEY}=0.05,0.2,0.4,0.8,1.0" "hydra.sweep.dir=${OUT}/single_class/${category}" "$@"
done
# Multi-class: one memory pooled over all categories.
python -m anomret.train -m +experiment=rad_mvtec retrieval.cap_k=true "${FRACTION_KEY}=0.05,0.1,0.2,0.4,0.8,1.0" \
  "hydra.sweep.dir=${OUT}/multi_class" "$@"
# Incremental-class: carpet, metal_nut, toothbrush, leather in full plus tau of the new class.
python -m anomret.train -m +experiment=rad_mvtec \
  "dataset.categories=[carpet,metal_nut,toothbrush,leather,${NEW_CLASS}]" "memory.subset_categories=[${NEW_CLASS}]" \
  "${FRACTION_KEY}=0.01,0.02,0.1,0.2,0.8,1.0" "hydra.sweep.dir=${OUT}/incremental_class" "$@"

# The single-class rows are the mean over categories of each tau (one report per category folder).
for category in ${CATEGORIES}; do
  python -m anomret.report "${OUT}/single_class/${category}" --no-plots
done
python -m anomret.report "${OUT}/multi_class"
# The incremental rows are the new class's rows of report_per_category.md.
python -m anomret.report "${OUT}/incremental_class" --per-category
