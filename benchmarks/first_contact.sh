#!/usr/bin/env bash
# A first contact with a GPU machine that has PyTorch and no network, in calls that each carry at most 64 MiB
# (docs/gpu.md says which calls to make):
#   benchmarks/first_contact.sh pack [--python 3.12] [--data TAR]   # here: fill .first-contact/call-{a,b,c}
#   benchmarks/first_contact.sh phase a|b|c                         # there, in the repo root, with OUT set
#   benchmarks/first_contact.sh --rehearse --out DIR                # here: the whole plan on this CPU machine
# The rehearsal builds a stand-in for the device image (a venv with the image's torch 2.11.0 / torchvision
# 0.26.0 and only those of its other packages the project needs), packs for that venv's Python, copies the
# working tree as a device call does, and runs phases A, B and C there from scratch, each with its device
# limit; DIR/first-contact.json then holds every step's record.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
image_torch="torch==2.11.0 torchvision==0.26.0"
image_packages="click pillow numpy pyyaml tqdm matplotlib fsspec pytest hypothesis six packaging"

pack() { make --no-print-directory setup && .venv/bin/python benchmarks/first_contact_pack.py "$@"; }

rehearse() {
  local out=$1 venv=$root/.first-contact/image-venv
  mkdir -p "$out" && out=$(cd "$out" && pwd)
  if [ "$(cat "$venv/.packages" 2>/dev/null)" != "$image_torch $image_packages" ]; then
    echo "the device image's stand-in: $venv ($image_torch)"
    rm -rf "$venv" && python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $image_torch $image_packages
    echo "$image_torch $image_packages" > "$venv/.packages"
  fi
  local python
  python=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  pack --python "$python" --out "$out/pack"
  rm -rf "$out/device" "$out"/out-? && mkdir -p "$out/device/.first-contact"
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$out/device"
  local call status=0 limit start
  for call in a b c; do
    cp -r "$out/pack/call-$call" "$out/device/.first-contact/"
    mkdir -p "$out/out-$call"
    limit=$(cd "$out/device" && "$venv/bin/python" -c "import benchmarks.first_contact as f; print(f.LIMITS['$call'])")
    start=$SECONDS
    (cd "$out/device" && OUT="$out/out-$call" PYTHON="$venv/bin/python" bash benchmarks/first_contact.sh phase $call) \
      || status=1
    echo "phase $call: $((SECONDS - start)) s of its ${limit%.*} s"
    if [ $((SECONDS - start)) -gt "${limit%.*}" ]; then echo "phase $call ran past its limit" >&2; status=1; fi
  done
  cp "$out/out-c/first-contact.json" "$out/first-contact.json"
  cat "$out"/out-?/first-contact.log > "$out/first-contact.log"
  echo "records: $out/first-contact.json"
  return $status
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  phase) exec "${PYTHON:-python3}" benchmarks/first_contact.py phase "${2:?usage: first_contact.sh phase a|b|c}" \
           --out "${OUT:?OUT must name the folder the records go to}" ;;
  --rehearse) [ "${2:-}" = --out ] || { echo "usage: benchmarks/first_contact.sh --rehearse --out DIR" >&2; exit 2; }
              rehearse "${3:?usage: benchmarks/first_contact.sh --rehearse --out DIR}" ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
