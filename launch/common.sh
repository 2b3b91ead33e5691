# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run).
#
# SFD_JAX_VERSION: the jax release every worker installs (jax[tpu] or jax[cuda12]); it must equal the pin in
# requirements.txt, which the CPU build uses, so that a config checked on a laptop compiles the same program.
# SFD_UV_VERSION / SFD_PYTHON: the uv release install.sh uses to bring its own CPython, and that Python's version
# (stock TPU VM images ship 3.10, which jax 0.10.2 does not support).

SFD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SFD_JAX_VERSION="0.10.2"
# shellcheck disable=SC2034  # read by the scripts that source this file
SFD_UV_VERSION="0.13.8"
# shellcheck disable=SC2034
SFD_PYTHON="3.11"

_pinned="$(sed -n 's/^jax==\([0-9.]*\)$/\1/p' "${SFD_ROOT}/requirements.txt")"
if [[ "${_pinned}" != "${SFD_JAX_VERSION}" ]]; then
  echo "launch/common.sh: SFD_JAX_VERSION=${SFD_JAX_VERSION} but requirements.txt pins jax==${_pinned}" >&2
  exit 1
fi

# Quotes "$@" for a remote shell.
sfd_quote_args() {
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  echo "${out}"
}

sfd_require() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      echo "$(basename "$0"): set ${name} (see the header of this script)" >&2
      exit 2
    fi
  done
}

# The TPU software version ("runtime") for an accelerator type, from the Cloud TPU docs' table for JAX.
# A wrong pairing fails only after the capacity was granted, so unknown types are refused here.
SFD_TPU_FAMILIES="v4-N (e.g. v4-32), v5litepod-N (v5e, e.g. v5litepod-16), v5p-N (e.g. v5p-64), v6e-N (e.g. v6e-8)"
sfd_tpu_runtime() {
  local family="" runtime=""
  [[ "$1" =~ ^(v4|v5litepod|v5p|v6e)-[0-9]+$ ]] && family="${BASH_REMATCH[1]}"
  case "${family}" in
    v4) runtime="tpu-ubuntu2204-base" ;;
    v5litepod) runtime="v2-alpha-tpuv5-lite" ;;
    v5p) runtime="v2-alpha-tpuv5" ;;
    v6e) runtime="v2-alpha-tpuv6e" ;;
    *)
      echo "$(basename "$0"): unknown accelerator type '$1'; known: ${SFD_TPU_FAMILIES}" >&2
      return 2
      ;;
  esac
  echo "${runtime}"
}

# The name of the TPU node(s) a queued resource or VM script works on: NAME, or NAME-0 .. NAME-(N-1) for N slices.
sfd_node_names() {
  local name="$1" count="$2" i
  if [[ "${count}" -gt 1 ]]; then
    for ((i = 0; i < count; i++)); do echo "${name}-${i}"; done
  else
    echo "${name}"
  fi
}

# A remote shell test, true while the trainer started by `tpu_vm_run.sh` with DETACH=1 (pid in DIR/train.pid)
# runs on that worker: setting up or starting a second one there would fight it for the TPU.
sfd_trainer_running() {
  local dir="$1"
  echo "[ -e ${dir}/train.pid ] && kill -0 \"\$(cat ${dir}/train.pid)\" 2>/dev/null"
}
