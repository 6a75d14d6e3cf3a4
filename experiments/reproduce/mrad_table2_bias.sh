#!/usr/bin/env bash
# MRAD Table 2: MRAD-CLIP with each source of the dynamic prompt bias, on MVTec-AD (memory/training from
# VisA), VisA (from MVTec-AD), Kvasir and HeadCT (from VisA).
#   experiments/reproduce/mrad_table2_bias.sh [OUT] [extra overrides]
# The paper's rows: static (none), + class token (cls), + cross-patch (not implemented: no value),
# + anomaly prior (anomaly), + dual prior (dual, the default). BIAS_KEY is the config key of the setting.
set -euo pipefail
OUT=${1:-logs/reproduce/mrad_table2_bias}
shift || true
BIAS_KEY=${BIAS_KEY:-model.prompts.bias_source}
BIASES=${BIASES:-none,cls,anomaly,dual}

python -m anomret.train -m +experiment=mrad_clip_mvtec dataset=mvtec,kvasir,headct "${BIAS_KEY}=${BIASES}" \
  "hydra.sweep.dir=${OUT}/aux_visa" "$@"
python -m anomret.train -m +experiment=mrad_clip_visa "${BIAS_KEY}=${BIASES}" \
  "hydra.sweep.dir=${OUT}/aux_mvtec" "$@"
# One row per (dataset, bias); plots of each metric against the bias, one line per dataset.
python -m anomret.report "${OUT}/aux_visa" "${OUT}/aux_mvtec" --out "${OUT}" --per-category
