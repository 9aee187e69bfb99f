#!/usr/bin/env bash
# Run HERE (with internet to PyPI), once, before a GPU session's device calls: puts what the device
# machine lacks into two git-ignored folders of the checkout, to be named in the device call's
# `carry`: .whl/ (cp312 wheels of SimpleITK, pydicom, cma, MONAI: the machine has torch, numpy,
# scipy, scikit-image, matplotlib, safetensors, tqdm) and .gpudata/pelvis_ct (the real pelvis CT).
# Together with the tracked tree they stay under the 64 MiB a device call carries (DiffDRR and its
# dependencies do not fit beside SimpleITK: the GPU run times our renderer alone, --no-peer).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info
for d in /.whl/ /.gpudata/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
py=${PYTHON:-python3}
sitk=$($py -c "import importlib.metadata as m; print(m.version('SimpleITK'))" 2>/dev/null || echo 2.5.2)
mkdir -p .whl
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "SimpleITK==$sitk" pydicom cma monai
data=${MSKDEX_DATA:-../shared/data}
mkdir -p .gpudata/pelvis_ct
cp "$data"/pelvis_ct/ct.nii.gz "$data"/pelvis_ct/labels_totalseg_v1.nii.gz "$data"/pelvis_ct/ATTRIBUTION.md .gpudata/pelvis_ct/
total=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
extra=$(du -cb .whl .gpudata | tail -1 | cut -f1)
echo "carry .whl + .gpudata: $((extra / 1048576)) MiB; with the working tree $(((total + extra) / 1048576)) MiB (limit 64)"
