#!/usr/bin/env bash
# Request TPU capacity through a queued resource (optionally spot, optionally several slices), wait until it is
# ACTIVE, install on every worker of every slice, and start training.
#
#   QR_NAME=sfd-xl ZONE=us-east5-a ACCELERATOR=v5p-64 launch/tpu_queued_resource.sh \
#       --config=configs/sfd.py:xl --workdir=gs://my-bucket/sfd/xl \
#       --config.data.source=arrayrecord --config.data.path=gs://my-bucket/imagenet_latents
#
# Optional: PROJECT; SPOT=1; NODE_COUNT=N for N slices joined over DCN (multislice: also pass
# --config.mesh.dcn="(N,1,1)" so that data parallelism spans slices and FSDP stays inside a slice);
# RUNTIME (default tpu-ubuntu2204-base; v5p/v6e may need their own, e.g. v2-alpha-tpuv5, v2-alpha-tpuv6e);
# EXTRA_PIP (default gcsfs); TIMEOUT_S for the wait (default 86400).
# On preemption every host receives SIGTERM: the trainer saves a checkpoint and exits 0; re-running this script
# (or tpu_vm_run.sh on the new nodes) resumes from the workdir.
set -euo pipefail
source "$(dirname "$0")/common.sh"
sfd_require QR_NAME ZONE ACCELERATOR
[[ $# -gt 0 ]] || { echo "usage: QR_NAME=.. ZONE=.. ACCELERATOR=.. $0 --config=... --workdir=... [flags]" >&2; exit 2; }

RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
NODE_COUNT="${NODE_COUNT:-1}"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="${PROJECT}")
capacity=()
[[ "${SPOT:-0}" == "1" ]] && capacity=(--spot)
if [[ "${NODE_COUNT}" -gt 1 ]]; then
  nodes=(--node-count="${NODE_COUNT}" --node-prefix="${QR_NAME}")
else
  nodes=(--node-id="${QR_NAME}")
fi

gcloud compute tpus queued-resources create "${QR_NAME}" --zone="${ZONE}" --accelerator-type="${ACCELERATOR}" \
  --runtime-version="${RUNTIME}" "${nodes[@]}" "${capacity[@]}" "${project_flag[@]}"

deadline=$(( $(date +%s) + ${TIMEOUT_S:-86400} ))
while true; do
  state="$(gcloud compute tpus queued-resources describe "${QR_NAME}" --zone="${ZONE}" "${project_flag[@]}" \
    --format='value(state.state)')"
  echo "$(date -u +%H:%M:%S) queued resource ${QR_NAME}: ${state}"
  case "${state}" in
    ACTIVE) break ;;
    FAILED|SUSPENDED) echo "queued resource ${QR_NAME} is ${state}" >&2; exit 1 ;;
  esac
  [[ $(date +%s) -lt ${deadline} ]] || { echo "timed out waiting for ${QR_NAME}" >&2; exit 1; }
  sleep 60
done

if [[ "${NODE_COUNT}" -gt 1 ]]; then
  node_names=()
  for ((i = 0; i < NODE_COUNT; i++)); do node_names+=("${QR_NAME}-${i}"); done
else
  node_names=("${QR_NAME}")
fi
for node in "${node_names[@]}"; do
  TPU_NAME="${node}" "$(dirname "$0")/tpu_vm_setup.sh"
done
# Multislice: the queued resource sets the MEGASCALE_* variables on every host, which also switches on
# jax.distributed (see sfd_jax.parallel). Start every slice detached, then return.
for node in "${node_names[@]}"; do
  TPU_NAME="${node}" DETACH=1 "$(dirname "$0")/tpu_vm_run.sh" "$@"
done
echo "training started on ${node_names[*]}; logs: ~/${SFD_DIR:-sfd_jax}/train_<host>.log on each worker"
