#!/usr/bin/env bash
# Create ./.venv (or $VENV) on Python 3.11 with sfd_jax's requirements and the accelerator build of jax at the
# pinned version, then check every version and the devices. Runs on the machine that trains (the TPU scripts run
# it on every worker); re-running it reuses the venv.
#
#   launch/install.sh tpu            # Cloud TPU VM: jax[tpu] (brings libtpu)
#   launch/install.sh cuda12         # NVIDIA GPUs: jax[cuda12] (CUDA from pip wheels; driver >= 525)
#   launch/install.sh cpu            # no accelerator (a login node, a laptop): requirements.txt only
#   launch/install.sh tpu gcsfs      # extra packages after the accelerator (gcsfs: gs:// workdirs and data)
#
# Python: stock TPU VM images ship Python 3.10 and jax 0.10.2 needs >= 3.11. The script installs uv (pinned, from
# PyPI, with the system pip into ~/.local: no root) and lets uv provide CPython 3.11: a python3.11 already on the
# machine, else a prebuilt standalone build it downloads. Chosen over the deadsnakes PPA because that needs sudo and
# apt, whose lock the TPU VM's unattended upgrades hold for minutes after boot, and works the same on every image.
# Optional: VENV (default .venv); EXPECT_LOCAL_DEVICES=N (fail unless this host sees N accelerators).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
accel="${1:-}"
case "${accel}" in
  tpu | cuda12) jax_pkg=("jax[${accel}]==${SFD_JAX_VERSION}") ;;
  cpu) jax_pkg=() ;;
  *) echo "usage: $0 tpu|cuda12|cpu [extra pip packages]" >&2; exit 2 ;;
esac
shift
cd "${SFD_ROOT}"
VENV="${VENV:-.venv}"
die() { echo "install.sh: $*" >&2; exit 1; }

# uv at the pinned version, in the user base (PYTHONUSERBASE, default ~/.local) where `pip install --user` puts it.
export PYTHONUSERBASE="${PYTHONUSERBASE:-${HOME}/.local}"
uv="${PYTHONUSERBASE}/bin/uv"
uv_ok() { [[ "$("${uv}" --version 2>/dev/null || true)" =~ ^uv\ ${SFD_UV_VERSION//./\\.}( |$) ]]; }
if ! uv_ok; then
  python3 -m pip --version >/dev/null 2>&1 ||
    die "python3 has no pip to install uv with: sudo apt-get install -y python3-pip, then re-run"
  # Newer Debian/Ubuntu mark the system Python externally managed; the variable lets a --user install through
  # there and is ignored by the older pip of Ubuntu 22.04 images.
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet "uv==${SFD_UV_VERSION}" ||
    die "pip could not install uv==${SFD_UV_VERSION} (is PyPI reachable?)"
  uv_ok || die "expected uv ${SFD_UV_VERSION} at ${uv} after installing it, found '$("${uv}" --version 2>&1 || true)'"
fi

# A venv left by an older install on the system Python (3.10) cannot take jax 0.10.2: rebuild it.
if [[ -e "${VENV}/bin/python" ]]; then
  have="$("${VENV}/bin/python" -c 'import sys; print(*sys.version_info[:2], sep=".")' 2>/dev/null || echo broken)"
  if [[ ! "${have}" =~ ^[0-9]+\.[0-9]+$ ]] ||
    [[ "$(printf '%s\n' "${SFD_PYTHON}" "${have}" | sort -V | head -n 1)" != "${SFD_PYTHON}" ]]; then
    echo "install.sh: ${VENV} has Python ${have}, needs >= ${SFD_PYTHON}; recreating it"
    rm -rf "${VENV}"
  fi
fi
if [[ ! -e "${VENV}/bin/python" ]]; then
  "${uv}" python find "${SFD_PYTHON}" >/dev/null 2>&1 || "${uv}" python install "${SFD_PYTHON}" ||
    die "uv could not provide Python ${SFD_PYTHON}"
  # --seed: pip inside the venv too, for anyone who adds a package by hand later.
  "${uv}" venv --seed --python "${SFD_PYTHON}" "${VENV}"
fi

# One resolve for everything, so the accelerator build cannot pull another jax than the one requirements.txt pins.
"${uv}" pip install --python "${VENV}/bin/python" -r requirements.txt "${jax_pkg[@]}" "$@"
"${VENV}/bin/python" launch/check_install.py --accel="${accel}" --jax="${SFD_JAX_VERSION}" --python="${SFD_PYTHON}"
