#!/usr/bin/env bash
# Train on the GPUs of one machine: one process drives all local GPUs (the mesh covers every device).
# All arguments go to `python -m sfd_jax.main` unchanged.
#
#   launch/gpu_single_node.sh --config=configs/sfd.py:xl_80ep --workdir=/data/runs/xl_80ep \
#       --config.data.source=arrayrecord --config.data.path=/data/imagenet_latents
#
# The first run installs .venv with jax[cuda12] at the pinned version (launch/install.sh cuda12).
# Optional: CUDA_VISIBLE_DEVICES; SKIP_INSTALL=1; VENV (default .venv).
# Ctrl-C or SIGTERM: the trainer saves a checkpoint and exits 0; re-running the same command resumes.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
[[ $# -gt 0 ]] || { echo "usage: $0 --config=configs/sfd.py:VARIANT --workdir=DIR [flags]" >&2; exit 2; }
cd "${SFD_ROOT}"
VENV="${VENV:-.venv}"
if [[ "${SKIP_INSTALL:-0}" != "1" ]] && ! "${VENV}/bin/python" -c "import jax_cuda12_plugin" 2>/dev/null; then
  VENV="${VENV}" bash launch/install.sh cuda12
fi
# Let XLA reserve most of the GPU memory up front (fewer fragmentation stalls in long runs).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

"${VENV}/bin/python" -m sfd_jax.main "$@" &
pid=$!
# Ctrl-C reaches this script only (a background job ignores SIGINT): pass it on as SIGTERM, the trainer's
# checkpoint-and-exit signal, then keep waiting until the checkpoint is written.
trap 'kill -TERM "${pid}" 2>/dev/null || true' INT TERM
rc=0
while kill -0 "${pid}" 2>/dev/null; do
  if wait "${pid}"; then rc=0; else rc=$?; fi
done
exit "${rc}"
