#!/usr/bin/env bash
# Fetches, into .whl/ (git-ignored via .git/info/exclude), the Python 3.12 wheels that jseg
# needs beyond what the leased GPU image has (jax with CUDA, flax, optax, orbax, torch,
# torchvision, timm are there; these are not). Run here, from the repository root.
set -euo pipefail
mkdir -p .whl .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for p in array-record==0.8.6 googleapis-common-protos==1.76.0 grain==0.2.18 immutabledict==4.3.1 \
         ml-collections==1.1.0 portpicker==1.6.0 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 \
         toml==0.10.2 segmentation-models-pytorch==0.6.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl "$p"
done
python3 -m pip wheel -q --no-deps -w .whl promise==2.3  # sdist only: built here (pure Python)
ls .whl
