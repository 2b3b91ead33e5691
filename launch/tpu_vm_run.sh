#!/usr/bin/env bash
# Run `python -m sfd_jax.main` on every worker of a TPU VM at once (one process per host; jax.distributed joins
# them). All arguments are passed to sfd_jax.main unchanged.
#
#   TPU_NAME=sfd-v4 ZONE=us-central2-b launch/tpu_vm_run.sh \
#       --config=configs/sfd.py:xl_80ep --workdir=gs://my-bucket/sfd/xl_80ep --mode=train \
#       --config.data.source=arrayrecord --config.data.path=gs://my-bucket/imagenet_latents
#
# The workdir must be visible to every host (a gs:// bucket, needs EXTRA_PIP=gcsfs at setup, or a shared mount).
# Re-running the same command resumes from the newest checkpoint in the workdir.
# Optional: PROJECT; DETACH=1 runs in the background on the workers (log: ~/sfd_jax/train_<worker>.log, pid in
# ~/sfd_jax/train.pid), so the job survives a dropped ssh connection, and a worker whose detached trainer still
# runs does not start a second one; SFD_DIR.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
sfd_require TPU_NAME ZONE
[[ $# -gt 0 ]] || { echo "usage: TPU_NAME=.. ZONE=.. $0 --config=configs/sfd.py:VARIANT --workdir=DIR [flags]" >&2; exit 2; }

project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="${PROJECT}")
remote_dir="${SFD_DIR:-sfd_jax}"
# SFD_DISTRIBUTED=1: one process per host, jax.distributed.initialize() finds the others through the TPU metadata.
train="SFD_DISTRIBUTED=1 .venv/bin/python -m sfd_jax.main$(sfd_quote_args "$@")"
if [[ "${DETACH:-0}" == "1" ]]; then
  # exec: the pid in train.pid is the trainer's own.
  start="nohup bash -c $(printf '%q' "exec env ${train}") > train_\$(hostname).log 2>&1 < /dev/null & \
echo \$! > train.pid"
  busy="echo \"\$(hostname): already training (pid \$(cat train.pid)), not starting another\""
else
  start="${train}"
  busy="echo \"\$(hostname): a detached trainer runs (pid \$(cat train.pid))\" >&2; exit 1"
fi
run="cd ${remote_dir} && if $(sfd_trainer_running .); then ${busy}; else ${start}; fi"

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all "${project_flag[@]}" --command="${run}"
