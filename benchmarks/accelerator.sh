#!/usr/bin/env bash
# One-shot benchmark for a lent GPU / TPU host: XL bf16 train-step MFU at two batch sizes (with the bf16 matmul
# peak of the same run), peak device memory, attention implementation, sampler img/s (Dopri5, Euler-250), and the
# bf16-vs-fp32 difference of the golden model. Prints one JSON on stdout; progress on stderr.
#   bash benchmarks/accelerator.sh [--dry-run]
# The 8-minute cap is enforced here so a stuck compile cannot eat a whole device lease.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$here/.."
exec timeout "${ACCELERATOR_TIMEOUT_S:-480}" "$python" "$here/accelerator.py" "$@"
