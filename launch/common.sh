# Shared by the launch scripts (sourced, not run).
#
# SFD_JAX_VERSION: the jax release every worker installs (jax[tpu] or jax[cuda12]); it must equal the pin in
# requirements.txt, which the CPU build uses, so that a config checked on a laptop compiles the same program.

SFD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SFD_JAX_VERSION="0.10.2"

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
