#!/usr/bin/env bash
# Fills .whl/ with every wheel that the GPU machine's image lacks, for bench/gpu/check.sh to install there.
# Run it HERE, where PyPI is reachable (the GPU machine reaches nothing):   bash bench/gpu/wheels.sh
#
# The image (bench/gpu/image-packages.txt) has python3 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0,
# accelerate, pandas, pyarrow... but none of: deepspeed and its hjson and pydantic (spin-fast's multi-process
# training), datasets and its dill and multiprocess (spin-fast's data loading, TRL), and the bench peers Liger-Kernel,
# Cut Cross-Entropy and TRL. Those travel as wheels, one version of each, chosen to work with the image's packages:
#   datasets 5.0.1    the newest that takes the image's huggingface-hub 1.33 with pyarrow >= 21 (5.1 wants >= 24)
#   pydantic 2.12.5   asks typing-extensions >= 4.14.1, which torch 2.11's image surely has (2.14 wants 4.16)
#   trl 1.16.0, liger-kernel 0.8.5, cut-cross-entropy 25.1.1: what the CPU venv runs; they import with
#                     transformers 5.17 (checked here with that version on the path)
# What cannot travel, and so stays unchecked on that machine: vLLM (hundreds of MB of CUDA wheels, over the 64 MiB
# that the working tree may take there) and flash-attn (no wheel on PyPI: it builds from source against CUDA). The
# benches report both as missing, and spin-fast falls back to transformers' generate and PyTorch's varlen attention.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
DEST=${SPIN_WHEELS_DIR:-.whl}

DEEPSPEED=deepspeed==0.19.8  # sdist only on PyPI: built here into a py3-none-any wheel
WHEELS=(
  hjson==3.1.0                                      # deepspeed
  pydantic==2.12.5 pydantic-core==2.41.5            # deepspeed's config
  annotated-types==0.7.0 typing-inspection==0.4.2   # pydantic
  datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 # datasets
  trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1  # the bench peers
)
# CPython 3.12 on x86-64 Linux; pip matches each manylinux tag exactly, so the usual ones are listed.
TARGET=(--python-version 3.12 --implementation cp --only-binary=:all:
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$DEST" "${WHEELS[@]}"
# DS_BUILD_OPS=0: no compiled op in the wheel; DeepSpeed builds what it needs on first use (JIT), there, for the
# GPU it finds. --no-cache-dir: built afresh, not a wheel cached from another build.
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-cache-dir -w "$DEST" "$DEEPSPEED"

# Every requirement met by another wheel or by the image, one version of each (exit status 1 otherwise).
"$PY" -m bench.gpu.check_wheels "$DEST" --image bench/gpu/image-packages.txt

total=$(du -sk "$DEST" | cut -f1)
echo "total: $((total / 1024)) MiB in $DEST (with the repo, the working tree that travels must stay under 64 MiB)"
if (( total > 32 * 1024 )); then
  echo "too large: keep the wheels under 32 MiB" >&2
  exit 1
fi
