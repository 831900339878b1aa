#!/usr/bin/env bash
# The GPU acceptance run, on a GPU machine with PyTorch preinstalled and no network (docs/gpu.md):
#   benchmarks/gpu_acceptance.sh WHEELS_DIR [benchmarks/gpu_acceptance.py options: --data TAR --out JSON ...]
# WHEELS_DIR holds what benchmarks/gpu_wheels.sh gathered (webdataset, kornia, cgan-pipe's own wheel, and
# optionally DALI with its codecs), any wheel possibly in pieces (NAME.whl.part-00, -01, ... and
# NAME.whl.sha256), which are joined and checked first. Every wheel there is installed, without touching
# the registry, into GPU_VENV (default .venv-gpu, which sees the system's torch and torchvision); then the
# driver runs: the torch backend's figures first, so a machine without DALI still yields most of the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=$(cd "${1:?usage: benchmarks/gpu_acceptance.sh WHEELS_DIR [options]}" && pwd)
shift
for first in "$wheels"/*.whl.part-00; do
  [ -e "$first" ] || continue
  whl=${first%.part-00}
  cat "$whl".part-* > "$whl.joining"
  mv "$whl.joining" "$whl"
  if [ -e "$whl.sha256" ]; then (cd "$wheels" && sha256sum --quiet -c "$(basename "$whl").sha256"); fi
  rm "$whl".part-*
done
venv=${GPU_VENV:-.venv-gpu}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps "$wheels"/*.whl
"$venv/bin/python" - <<'PY'
import importlib.util, torch, torchvision
found = {name: importlib.util.find_spec(name) is not None for name in ("webdataset", "kornia", "nvidia.dali")}
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA: {torch.cuda.is_available()}, {found}")
PY
exec "$venv/bin/python" benchmarks/gpu_acceptance.py "$@"
