#!/usr/bin/env bash
# Download the wheels bench/gpu_wheels.txt lists, for the GPU machine's Python (3.12, x86-64 Linux),
# into .whl/ (ignored by git). There, before bench/gpu_check.py:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^\s*#' bench/gpu_wheels.txt | grep -v '^\s*$' | while read -r spec; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "$spec" 2>/dev/null \
        || python3 -m pip wheel -q --no-deps -w .whl "$spec"  # published as source only (pure Python)
done
# the project's own wheel: its entry points register the built-in plugins there
rm -f .whl/qcompare-*.whl
python3 -m pip wheel -q --no-deps -w .whl .
du -sh .whl
