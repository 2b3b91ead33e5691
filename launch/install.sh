#!/usr/bin/env bash
# Create ./.venv (or $VENV) with sfd_jax's requirements and the accelerator build of jax at the pinned version.
# Runs on the machine that trains (the TPU scripts run it on every worker).
#
#   launch/install.sh tpu            # Cloud TPU VM: jax[tpu]
#   launch/install.sh cuda12         # NVIDIA GPUs: jax[cuda12] (CUDA from pip wheels; driver >= 525)
#   launch/install.sh tpu gcsfs      # extra packages after the accelerator (gcsfs: gs:// workdirs and data)
set -euo pipefail
source "$(dirname "$0")/common.sh"
accel="${1:-}"
case "${accel}" in
  tpu|cuda12) shift ;;
  *) echo "usage: $0 tpu|cuda12 [extra pip packages]" >&2; exit 2 ;;
esac
cd "${SFD_ROOT}"
VENV="${VENV:-.venv}"
[[ -x "${VENV}/bin/python" ]] || python3 -m venv "${VENV}"
"${VENV}/bin/pip" install -q --upgrade pip
"${VENV}/bin/pip" install -q -r requirements.txt
"${VENV}/bin/pip" install -q "jax[${accel}]==${SFD_JAX_VERSION}" "$@"
"${VENV}/bin/python" -c "import jax; print('jax', jax.__version__, '|', jax.device_count(), 'devices |', \
jax.devices()[0].device_kind)"
