"""Checks the environment launch/install.sh built, with the venv's Python: every version the project relies on.

    .venv/bin/python launch/check_install.py --accel=tpu|cuda12|cpu --jax=0.10.2 --python=3.11

Prints one summary line and exits 0, or prints each problem (what was found, what was expected, what to do) and
exits 1. EXPECT_LOCAL_DEVICES=N also checks the number of accelerators this host sees.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import sys

PLATFORM = {"tpu": "tpu", "cuda12": "gpu", "cpu": "cpu"}


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def jax_pin(extra: str, dist: str) -> str | None:
    """The version of `dist` that the installed jax asks for under `extra` (e.g. libtpu 0.0.42.* for tpu)."""
    for req in metadata.requires("jax") or []:
        m = re.match(rf"{re.escape(dist)}\s*(?:\[[^\]]*\])?\s*==\s*([\w.*]+)\s*;.*extra\s*==\s*\"{extra}\"", req)
        if m:
            return m.group(1)
    return None


def matches(version: str, spec: str) -> bool:
    return version.startswith(spec[:-1]) if spec.endswith("*") else version == spec


def check_versions(accel: str, want_jax: str, want_python: str) -> list[str]:
    problems = []
    major, minor = (int(x) for x in want_python.split("."))
    if sys.version_info[:2] < (major, minor):
        problems.append(
            f"python {sys.version.split()[0]} at {sys.executable}: jax {want_jax} needs >= {want_python}; "
            "delete the venv and re-run launch/install.sh"
        )
    for dist in ("jax", "jaxlib"):
        got = installed(dist)
        if got != want_jax:
            problems.append(f"{dist} {got or 'not installed'}: expected {want_jax} (the pin in requirements.txt)")
    if problems:
        return problems  # the pins below are read from jax's own metadata, meaningless for another jax
    if accel == "tpu":
        spec = jax_pin("tpu", "libtpu")
        got = installed("libtpu")
        if got is None:
            problems.append(f"libtpu is not installed: jax[tpu]=={want_jax} brings libtpu=={spec}")
        elif spec and not matches(got, spec):
            problems.append(f"libtpu {got}: jax {want_jax} was built against libtpu=={spec}")
    elif accel == "cuda12":
        got = installed("jax-cuda12-plugin")
        if got != want_jax:
            problems.append(f"jax-cuda12-plugin {got or 'not installed'}: expected {want_jax} (jax[cuda12])")
    return problems


def check_devices(accel: str) -> tuple[list[str], str]:
    import jax

    try:
        devices = jax.local_devices()
    except RuntimeError as e:  # e.g. the TPU is held by another process (a trainer still running)
        hint = " Is another process using the TPU? (sudo lsof -w /dev/accel* /dev/vfio/*)" if accel == "tpu" else ""
        return [f"jax could not open the {accel} backend: {e}.{hint}"], ""
    platform = devices[0].platform
    problems = []
    if platform != PLATFORM[accel]:
        problems.append(
            f"jax runs on {platform} ({len(devices)} devices), expected {PLATFORM[accel]} for --accel={accel}"
        )
    expected = os.environ.get("EXPECT_LOCAL_DEVICES")
    if expected and int(expected) != len(devices):
        problems.append(f"{len(devices)} local {platform} devices, EXPECT_LOCAL_DEVICES={expected}")
    summary = f"{len(devices)} local / {jax.device_count()} global {platform} devices ({devices[0].device_kind})"
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accel", choices=sorted(PLATFORM), required=True)
    parser.add_argument("--jax", required=True, help="the jax version every package must match")
    parser.add_argument("--python", default="3.11", help="the lowest Python version jax supports")
    args = parser.parse_args(argv)
    problems = check_versions(args.accel, args.jax, args.python)
    summary = ""
    if not problems:
        problems, summary = check_devices(args.accel)
    if problems:
        for p in problems:
            print(f"check_install: {p}", file=sys.stderr)
        return 1
    extra = {
        "tpu": f" | libtpu {installed('libtpu')}",
        "cuda12": f" | jax-cuda12-plugin {installed('jax-cuda12-plugin')}",
    }.get(args.accel, "")
    print(
        f"check_install: ok | python {sys.version.split()[0]} | jax {installed('jax')} | jaxlib "
        f"{installed('jaxlib')}{extra} | {summary}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
