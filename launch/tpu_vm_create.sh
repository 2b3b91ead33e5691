#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), copy this repository to every worker and install the TPU
# build of jax there.
#
#   TPU_NAME=sfd-v4 ZONE=us-central2-b ACCELERATOR=v4-32 launch/tpu_vm_create.sh
#
# The TPU software version follows from ACCELERATOR: v4-N → tpu-ubuntu2204-base, v5litepod-N (v5e) →
# v2-alpha-tpuv5-lite, v5p-N → v2-alpha-tpuv5, v6e-N → v2-alpha-tpuv6e; other types are refused.
# Optional: PROJECT (default: gcloud's), RUNTIME (override the software version), SPOT=1 (preemptible capacity),
# EXTRA_PIP (default gcsfs, for gs:// workdirs), SFD_DIR (default ~/sfd_jax).
# Then start training with launch/tpu_vm_run.sh.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
sfd_require TPU_NAME ZONE ACCELERATOR

runtime="$(sfd_tpu_runtime "${ACCELERATOR}")" || exit 2
RUNTIME="${RUNTIME:-${runtime}}"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="${PROJECT}")
spot_flag=()
[[ "${SPOT:-0}" == "1" ]] && spot_flag=(--spot)

gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" --accelerator-type="${ACCELERATOR}" \
  --version="${RUNTIME}" "${project_flag[@]}" "${spot_flag[@]}"

"$(dirname "$0")/tpu_vm_setup.sh"
