#!/usr/bin/env bash
# RAD Table A4: ablation of multi-layer memory, global context retrieval and spatial conditioning on
# MVTec-AD. Five single runs, one per row of the table, then one report over them.
#   experiments/reproduce/rad_ablation_a4.sh [OUT] [extra overrides]
# The keys are variables because they belong to RAD's configs:
#   SINGLE_LAYER  override(s) that keep only the last layer (paper: layer 12 alone);
#   NO_GLOBAL     override(s) that retrieve patches from every memory image (no top-K by CLS);
#   NO_SPATIAL    override(s) that search the whole image of each neighbour (no window rho).
set -euo pipefail
OUT=${1:-logs/reproduce/rad_ablation_a4}
shift || true
SINGLE_LAYER=${SINGLE_LAYER:-"model.layers=[12]"}
NO_GLOBAL=${NO_GLOBAL:-"retrieval.k=null"}
NO_SPATIAL=${NO_SPATIAL:-"retrieval.rho=null"}

run() {  # run NAME OVERRIDES...
  local name=$1
  shift
  python -m anomret.train +experiment=rad_mvtec "hydra.run.dir=${OUT}/${name}" "$@"
}
# shellcheck disable=SC2086  # the variables hold space-separated overrides
run 1_single_global ${SINGLE_LAYER} ${NO_SPATIAL} "$@"
run 2_single_global_spatial ${SINGLE_LAYER} "$@"
run 3_multi ${NO_GLOBAL} ${NO_SPATIAL} "$@"
run 4_multi_global ${NO_SPATIAL} "$@"
run 5_multi_global_spatial "$@"
python -m anomret.report "${OUT}" --no-plots
