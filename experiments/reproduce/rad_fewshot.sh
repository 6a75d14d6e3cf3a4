#!/usr/bin/env bash
# RAD few-shot, multi-class MVTec-AD (Figure 3, Table A1): at most Y normal references per category.
#   experiments/reproduce/rad_fewshot.sh [OUT] [extra overrides]
# SHOTS_KEY is the config key of the number of references per category in rad_fewshot_mvtec;
# SEEDS repeats each budget with other draws of the references (the report shows one row per job).
set -euo pipefail
OUT=${1:-logs/reproduce/rad_fewshot}
shift || true
SHOTS_KEY=${SHOTS_KEY:-memory.shots}
SHOTS=${SHOTS:-1,2,4,8,16}
SEEDS=${SEEDS:-0}

python -m anomret.train -m +experiment=rad_fewshot_mvtec "${SHOTS_KEY}=${SHOTS}" "memory.seed=${SEEDS}" \
  "hydra.sweep.dir=${OUT}" "$@"
# Plots of every metric against the number of shots (one line per seed when several).
python -m anomret.report "${OUT}"
