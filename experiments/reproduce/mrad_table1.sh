#!/usr/bin/env bash
# MRAD Table 1: each variant zero-shot on the 16 targets, then the report in the paper's layout.
# Memory/training source VisA for every target but VisA, which uses MVTec-AD (the *_visa experiments).
# Needs the CLIP ViT-L/14@336 weights and the datasets under $ANOMRET_DATA_DIR (README "Datasets").
#   experiments/reproduce/mrad_table1.sh [OUT] [extra overrides, e.g. trainer=gpu hydra/launcher=slurm_gpu]
set -euo pipefail
OUT=${1:-logs/reproduce/mrad_table1}
shift || true
VARIANTS=${VARIANTS:-"tf ft clip"}
TARGETS=mvtec,btad,mpdd,dtd,sdd,ksdd2,dagm,isic,colondb,clinicdb,kvasir,endo,headct,brainmri,br35h

for variant in $VARIANTS; do
  python -m anomret.train -m "+experiment=mrad_${variant}_mvtec" "dataset=${TARGETS}" \
    "hydra.sweep.dir=${OUT}/mrad_${variant}/aux_visa" "$@"
  python -m anomret.train -m "+experiment=mrad_${variant}_visa" \
    "hydra.sweep.dir=${OUT}/mrad_${variant}/aux_mvtec" "$@"
  # One row per target, the paper's order and Average: paper_table1.md / .csv beside report.md.
  python -m anomret.report "${OUT}/mrad_${variant}" --paper
done
