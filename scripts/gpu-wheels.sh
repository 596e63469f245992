#!/usr/bin/env bash
# Wheels for scripts/gpu-check.sh: the packages hpo imports that a lent GPU machine's image lacks.
#
# That machine (docs/gpu.md, "Running the GPU checks") has Python 3.12 with PyTorch, torchvision,
# scikit-learn, PyYAML, rich and pytest, no package index, and takes at most 64 MiB of the
# working tree. Run this here, where pip reaches PyPI: it saves the same versions as this
# checkout's .venv (or the fallbacks below) as Python 3.12 x86-64 wheels in .whl/ (git-ignored),
# which the device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
version() {  # the version this checkout's .venv holds, else the fallback given
    if [ -x "$py" ]; then "$py" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null && return; fi
    echo "$2"
}
packages=(
    "optuna==$(version optuna 5.0.0)"
    "sqlalchemy==$(version sqlalchemy 2.1.9)"
    "alembic==$(version alembic 1.20.1)"
    "mako==$(version mako 1.4.3)"
    "colorlog==$(version colorlog 6.12.0)"
    "greenlet==$(version greenlet 3.5.6)"
    "pydantic==$(version pydantic 2.14.4)"
    "pydantic-core==$(version pydantic-core 2.50.5)"
    "annotated-types==$(version annotated-types 0.8.0)"
    "typing-inspection==$(version typing-inspection 0.4.5)"
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${packages[@]}"
ls -la .whl
du -sh .whl
