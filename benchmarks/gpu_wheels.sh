#!/usr/bin/env bash
# Gather, on a machine that reaches a package registry, the wheels that benchmarks/gpu_acceptance.sh
# installs on an offline GPU machine (CPython 3.12, x86-64, PyTorch preinstalled):
#   benchmarks/gpu_wheels.sh OUT_DIR            # webdataset, kornia and cgan-pipe itself (~8 MB)
#   benchmarks/gpu_wheels.sh OUT_DIR --with-dali  # also DALI 2.4 with its codecs (~300 MB)
# A wheel over PIECE_MB (default 60) MiB is split into NAME.whl.part-00, -01, ... with NAME.whl.sha256,
# so that each piece fits one 64 MiB transfer; gpu_acceptance.sh joins and checks them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_wheels.sh OUT_DIR [--with-dali]}
mkdir -p "$out"
version=${PYTHON_VERSION:-3.12}
target=(--no-deps --only-binary=:all: --python-version "$version" --implementation cp --abi "cp${version/./}"
        --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
download() { python3 -m pip download --quiet --disable-pip-version-check "${target[@]}" -d "$out" "$@"; }
download webdataset braceexpand kornia kornia_rs
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$out" .
if [ "${2:-}" = --with-dali ]; then
  # the versions DALI 2.4 runs with in this project's own environment (nvimgcodec wants libnvcomp < 6)
  download nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 \
    nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 astunparse gast libcst \
    makefun nvtx optree six wheel packaging typing_extensions
fi
piece=$(( ${PIECE_MB:-60} * 1024 * 1024 ))
for whl in "$out"/*.whl; do
  if [ "$(stat -c %s "$whl")" -gt "$piece" ]; then
    (cd "$out" && sha256sum "$(basename "$whl")" > "$(basename "$whl").sha256")
    split -b "$piece" -d "$whl" "$whl.part-"
    rm "$whl"
  fi
done
ls -l "$out"
