#!/usr/bin/env bash
# Copy this repository to every worker of an existing TPU VM and install it there (launch/install.sh tpu).
# Re-run after changing the code; the venv is reused. A worker whose trainer (DETACH=1) still runs is left alone.
#
#   TPU_NAME=sfd-v4 ZONE=us-central2-b launch/tpu_vm_setup.sh
#
# Optional: PROJECT; EXTRA_PIP (default gcsfs, for gs:// workdirs and data); SFD_DIR (remote directory,
# default sfd_jax in the home directory).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
sfd_require TPU_NAME ZONE

project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="${PROJECT}")
remote_dir="${SFD_DIR:-sfd_jax}"

# The tracked and the untracked-but-not-ignored files: no .venv, no workdirs, and not the test vectors (38 MB that
# training never reads).
tarball="$(mktemp /tmp/sfd_jax.XXXXXX.tar.gz)"
trap 'rm -f "${tarball}"' EXIT
(cd "${SFD_ROOT}" && git ls-files -co --exclude-standard -z -- . ':!tests/golden' |
  tar --null -czf "${tarball}" -T -)

gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:sfd_jax.tar.gz" --zone="${ZONE}" --worker=all \
  "${project_flag[@]}"
install="mkdir -p ${remote_dir} && tar -xzf sfd_jax.tar.gz -C ${remote_dir} && \
bash ${remote_dir}/launch/install.sh tpu ${EXTRA_PIP-gcsfs}"
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all "${project_flag[@]}" \
  --command="if $(sfd_trainer_running "${remote_dir}"); then echo \"\$(hostname): trainer running, not reinstalling\"; \
else ${install}; fi"
