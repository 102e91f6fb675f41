#!/usr/bin/env bash
# Idempotent setup: apt toolchains (aarch64 cross compiler, qemu-user, host gcc for the QEMU plugin;
# arm-none-eabi + newlib, qemu-system-arm and the armhf cross compiler for the embedded C-library targets),
# the project venv with pinned Python deps, the aarch64 TVM runtime harvested from PyPI's aarch64
# wheels, and the QEMU instruction-counting plugin (header from Debian's qemu source package).
# Re-running it is cheap: each step checks whether its result is already present.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${GRAPHOPT_VENV:-.venv}

APT_PKGS=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user gcc libc6-dev file
          gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
          cmake make dataset-fashion-mnist)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] apt: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "[setup] apt: toolchains present"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.graphopt-deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] pip: installing graphopt and pinned deps"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned, so nothing later pulls a CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  # the test extra brings pytest and the linters `make lint` runs (ruff, mypy), pinned in pyproject
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$stamp"
else
  echo "[setup] pip: deps up to date"
fi
# The real-code zoo's pytorchcv models (tests/test_real_code.py). pytorchcv declares torchvision,
# which would replace the pinned torch; the zoo imports only its torchvision-free model modules.
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pytorchcv') != '0.0.74')" \
    2>/dev/null; then
  echo "[setup] pip: pytorchcv 0.0.74 without dependencies"
  "$VENV/bin/python" -m pip install -q --no-deps "pytorchcv==0.0.74"
fi

echo "[setup] aarch64 TVM runtime and QEMU instruction-count plugin"
"$VENV/bin/graphopt" setup-runtime
echo "[setup] done"
