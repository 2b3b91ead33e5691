#!/usr/bin/env bash
# Copy this repository to every worker of an existing TPU VM and install it there (launch/install.sh tpu).
# Re-run after changing the code; the venv is reused.
#
#   TPU_NAME=sfd-v4 ZONE=us-central2-b launch/tpu_vm_setup.sh
#
# Optional: PROJECT; EXTRA_PIP (default gcsfs, for gs:// workdirs and data); SFD_DIR (remote directory,
# default sfd_jax in the home directory).
set -euo pipefail
source "$(dirname "$0")/common.sh"
sfd_require TPU_NAME ZONE

project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="${PROJECT}")
remote_dir="${SFD_DIR:-sfd_jax}"

# The tracked and the untracked-but-not-ignored files: no .venv, no workdirs.
tarball="$(mktemp /tmp/sfd_jax.XXXXXX.tar.gz)"
trap 'rm -f "${tarball}"' EXIT
(cd "${SFD_ROOT}" && git ls-files -co --exclude-standard -z | tar --null -czf "${tarball}" -T -)

gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:sfd_jax.tar.gz" --zone="${ZONE}" --worker=all \
  "${project_flag[@]}"
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all "${project_flag[@]}" \
  --command="mkdir -p ${remote_dir} && tar -xzf sfd_jax.tar.gz -C ${remote_dir} && \
bash ${remote_dir}/launch/install.sh tpu ${EXTRA_PIP-gcsfs}"
