#!/usr/bin/env bash
# Request TPU capacity through a queued resource (optionally spot, optionally several slices), wait until it is
# ACTIVE, install on every worker of every slice, and start training detached.
#
#   QR_NAME=sfd-xl ZONE=us-east5-a ACCELERATOR=v5p-64 launch/tpu_queued_resource.sh \
#       --config=configs/sfd.py:xl --workdir=gs://my-bucket/sfd/xl \
#       --config.data.source=arrayrecord --config.data.path=gs://my-bucket/imagenet_latents
#
# Re-running the same command resumes the job, whatever became of the resource:
#   none                     → create it, wait, set up, start;
#   CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING → wait for it, set up, start;
#   ACTIVE                   → set up and start on the workers where the trainer no longer runs (it resumes from
#                              the workdir's newest checkpoint); workers still training are left alone;
#   SUSPENDING, SUSPENDED, FAILED (preempted, or never granted) → delete it, create it anew, wait, set up, start;
#   DELETING                 → wait until it is gone, then as for none.
# An existing resource of another accelerator type is refused (delete it or pick another QR_NAME).
#
# The TPU software version follows from ACCELERATOR (v4, v5litepod, v5p, v6e; see tpu_vm_create.sh).
# Optional: PROJECT; SPOT=1; NODE_COUNT=N for N slices joined over DCN (multislice: also pass
# --config.mesh.dcn="(N,1,1)" so that data parallelism spans slices and FSDP stays inside a slice);
# RUNTIME (override the software version); EXTRA_PIP (default gcsfs); TIMEOUT_S for the wait (default 86400);
# POLL_S between state checks (default 60).
# On preemption every host receives SIGTERM: the trainer saves a checkpoint and exits 0.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
sfd_require QR_NAME ZONE ACCELERATOR
[[ $# -gt 0 ]] || { echo "usage: QR_NAME=.. ZONE=.. ACCELERATOR=.. $0 --config=... --workdir=... [flags]" >&2; exit 2; }

runtime="$(sfd_tpu_runtime "${ACCELERATOR}")" || exit 2
RUNTIME="${RUNTIME:-${runtime}}"
NODE_COUNT="${NODE_COUNT:-1}"
POLL_S="${POLL_S:-60}"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="${PROJECT}")
capacity=()
[[ "${SPOT:-0}" == "1" ]] && capacity=(--spot)
if [[ "${NODE_COUNT}" -gt 1 ]]; then
  nodes=(--node-count="${NODE_COUNT}" --node-prefix="${QR_NAME}")
else
  nodes=(--node-id="${QR_NAME}")
fi
qr=(gcloud compute tpus queued-resources)
log() { echo "$(date -u +%H:%M:%S) queued resource ${QR_NAME}: $*"; }

# Prints "STATE ACCELERATOR_TYPE", or "NONE" when no resource has that name; any other gcloud error stops here.
describe() {
  local out err
  err="$(mktemp)"
  if out="$("${qr[@]}" describe "${QR_NAME}" --zone="${ZONE}" "${project_flag[@]}" \
    --format='value(state.state,tpu.nodeSpec[0].node.acceleratorType)' 2>"${err}")"; then
    rm -f "${err}"
    echo "${out}"
  elif grep -q NOT_FOUND "${err}"; then
    rm -f "${err}"
    echo NONE
  else
    cat "${err}" >&2
    rm -f "${err}"
    return 1
  fi
}

create() {
  "${qr[@]}" create "${QR_NAME}" --zone="${ZONE}" --accelerator-type="${ACCELERATOR}" \
    --runtime-version="${RUNTIME}" "${nodes[@]}" "${capacity[@]}" "${project_flag[@]}"
}

deadline=$(($(date +%s) + ${TIMEOUT_S:-86400}))
while true; do
  desc="$(describe)" || exit 1
  read -r state accel_type <<<"${desc}"
  log "${state}${accel_type:+ (${accel_type})}"
  if [[ "${state}" != NONE && -n "${accel_type}" && "${accel_type}" != "${ACCELERATOR}" ]]; then
    echo "queued resource ${QR_NAME} exists with ${accel_type}, not ${ACCELERATOR}: delete it" \
      "(${qr[*]} delete ${QR_NAME} --zone=${ZONE} --force) or choose another QR_NAME" >&2
    exit 1
  fi
  case "${state}" in
    ACTIVE) break ;;
    NONE) create ;;
    FAILED | SUSPENDED)
      log "deleting it to request the capacity again"
      "${qr[@]}" delete "${QR_NAME}" --zone="${ZONE}" "${project_flag[@]}" --quiet
      create
      ;;
    # SUSPENDING (preempted nodes being torn down) ends in SUSPENDED, DELETING in NONE: wait for either.
    CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | SUSPENDING | DELETING) ;;
    *) echo "queued resource ${QR_NAME}: unexpected state '${state}'" >&2; exit 1 ;;
  esac
  [[ $(date +%s) -lt ${deadline} ]] || { echo "timed out waiting for ${QR_NAME}" >&2; exit 1; }
  sleep "${POLL_S}"
done

mapfile -t node_names < <(sfd_node_names "${QR_NAME}" "${NODE_COUNT}")
for node in "${node_names[@]}"; do
  TPU_NAME="${node}" "$(dirname "$0")/tpu_vm_setup.sh"
done
# Multislice: the queued resource sets the MEGASCALE_* variables on every host, which also switches on
# jax.distributed (see sfd_jax.parallel). Start every slice detached, then return.
for node in "${node_names[@]}"; do
  TPU_NAME="${node}" DETACH=1 "$(dirname "$0")/tpu_vm_run.sh" "$@"
done
echo "training started on ${node_names[*]}; logs: ~/${SFD_DIR:-sfd_jax}/train_<host>.log on each worker"
