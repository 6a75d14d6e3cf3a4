#!/usr/bin/env bash
# The wheels bench_gpu.py needs on a GPU machine without network that has torch, lightning, timm, triton,
# scipy and safetensors already (see bench_gpu.py). Run here, where pip reaches PyPI, from the repository
# root; the wheels land in .whl/ (kept out of git by .git/info/exclude):
#
#   bash experiments/benchmarks/gpu_wheels.sh [python version of the GPU machine, default 3.12]
#
# On the GPU machine, from the repository root with .whl/ beside it:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 WANDB_MODE=disabled python3 experiments/benchmarks/bench_gpu.py
set -euo pipefail
python_version="${1:-3.12}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  "${platforms[@]}" -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 PyYAML==6.0.4 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# antlr4-python3-runtime 4.9.3 (hydra's parser) is published as an sdist only: a pure-Python wheel of it.
python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
