"""Stand-ins for gcloud, srun, scontrol, uv and the system python3, used by tests/test_launch.py.

Each call appends {"argv": [name, *args]} as one JSON line to $FAKE_DIR/calls.jsonl and answers the way the real
tool does (messages and exit codes modelled on gcloud's, uv's and SLURM's). $FAKE_DIR/state.json holds what the
fake cloud knows (queued resources and the states each will report next) and what the fake machine has.
    python launch_fakes.py NAME ARGS...   (tests/test_launch.py writes one small wrapper per NAME on PATH)
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time

PROJECT = "my-project"


def fake_dir() -> pathlib.Path:
    return pathlib.Path(os.environ["FAKE_DIR"])


def record(**entry) -> None:
    with open(fake_dir() / "calls.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def load_state() -> dict:
    path = fake_dir() / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(state: dict) -> None:
    (fake_dir() / "state.json").write_text(json.dumps(state))


def flag(args: list[str], name: str) -> str | None:
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def wrapper(path: pathlib.Path, name: str) -> None:
    """An executable `path` that runs this fake as `name`."""
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{pathlib.Path(__file__).resolve()}" {name} "$@"\n')
    path.chmod(0o755)


def gcloud(args: list[str]) -> int:
    state = load_state()
    group, verb, name = args[2], args[3], args[4]
    zone = flag(args, "zone")
    operation = f"projects/{PROJECT}/locations/{zone}/operations/operation-1733443200000-5f1c2a9e"
    if group == "queued-resources":
        qrs = state.setdefault("queued_resources", {})
        resource = f"projects/{PROJECT}/locations/{zone}/queuedResources/{name}"
        if verb == "describe":
            if "describe_error" in state:
                print(state["describe_error"], file=sys.stderr)
                return 1
            if name not in qrs:
                print(
                    f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource '{resource}' was "
                    "not found",
                    file=sys.stderr,
                )
                return 1
            qr = qrs[name]
            current = qr["states"].pop(0) if len(qr["states"]) > 1 else qr["states"][0]
            save_state(state)
            # --format='value(state.state,tpu.nodeSpec[0].node.acceleratorType)': tab-separated columns.
            print(f"{current}\t{qr['accelerator_type']}")
            return 0
        if verb == "create":
            if name in qrs:
                print(
                    f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: Resource '{resource}' "
                    "already exists",
                    file=sys.stderr,
                )
                return 1
            qrs[name] = {
                "states": list(state.get("states_after_create", ["ACTIVE"])),
                "accelerator_type": flag(args, "accelerator-type"),
            }
            save_state(state)
            print(
                f"Create request issued for: [{name}]\nWaiting for operation [{operation}] to complete...done.\n"
                f"Created queued resource [{name}].",
                file=sys.stderr,
            )
            return 0
        if verb == "delete":
            if name not in qrs:
                print(
                    f"ERROR: (gcloud.compute.tpus.queued-resources.delete) NOT_FOUND: Resource '{resource}' was "
                    "not found",
                    file=sys.stderr,
                )
                return 1
            del qrs[name]
            save_state(state)
            print(
                f"Delete request issued for: [{name}]\nWaiting for operation [{operation}] to complete...done.\n"
                f"Deleted queued resource [{name}].",
                file=sys.stderr,
            )
            return 0
    if group == "tpu-vm":
        if verb == "create":
            print(
                f"Create request issued for: [{name}]\nWaiting for operation [{operation}] to complete...done.\n"
                f"Created tpu [{name}].",
                file=sys.stderr,
            )
            return 0
        if verb == "scp":  # keep what was sent, for the test to look into
            (fake_dir() / "scp_payload.tar.gz").write_bytes(pathlib.Path(name).read_bytes())
            return 0
        if verb == "ssh":
            print(
                "Using ssh batch size of 1. Attempting to SSH into 1 nodes with a total of 4 workers.", file=sys.stderr
            )
            return 0
    print(f"ERROR: (gcloud) the fake does not know `gcloud {' '.join(args)}`", file=sys.stderr)
    return 2


def srun(args: list[str]) -> int:
    """The job step: a trainer that checkpoints and exits on SIGTERM, or ends by itself after FAKE_SRUN_SECONDS."""

    def on_term(signum, frame):
        record(argv=["srun"], signal="TERM")
        sys.exit(int(os.environ.get("FAKE_SRUN_TERM_RC", "0")))

    signal.signal(signal.SIGTERM, on_term)
    record(argv=["srun", *args])  # after the handler is in place: the test signals once it sees this line
    time.sleep(float(os.environ.get("FAKE_SRUN_SECONDS", "60")))
    return int(os.environ.get("FAKE_SRUN_RC", "0"))


def uv(args: list[str]) -> int:
    state = load_state()
    if args == ["--version"]:
        print(f"uv {state['uv_version']}")
        return 0
    if args[:2] == ["python", "find"]:
        if not state.get("python_installed"):
            print(
                f"error: No interpreter found for Python {args[2]} in managed installations or search path",
                file=sys.stderr,
            )
            return 2
        print(f"{os.environ['HOME']}/.local/share/uv/python/cpython-3.11.14-linux-x86_64-gnu/bin/python3.11")
        return 0
    if args[:2] == ["python", "install"]:
        state["python_installed"] = True
        save_state(state)
        print("Installed Python 3.11.14 in 2.31s\n + cpython-3.11.14-linux-x86_64-gnu", file=sys.stderr)
        return 0
    if args[0] == "venv":
        venv = pathlib.Path(args[-1])
        (venv / "bin").mkdir(parents=True)
        # The venv's python is the test's own interpreter (3.11, CPU jax), so check_install.py really runs.
        py = venv / "bin" / "python"
        py.write_text(f'#!/bin/sh\nexec "{os.environ["FAKE_PYTHON"]}" "$@"\n')
        py.chmod(0o755)
        print(
            f"Using CPython 3.11.14\nCreating virtual environment with seed packages at: {venv}\n + pip==25.3\n"
            f"Activate with: source {venv}/bin/activate",
            file=sys.stderr,
        )
        return 0
    if args[:2] == ["pip", "install"]:
        print("Resolved 97 packages in 1.52s\nInstalled 97 packages in 310ms", file=sys.stderr)
        return 0
    return 2


def python3(args: list[str]) -> int:
    """The image's Python 3.10 with its pip; `pip install --user uv==V` puts a fake uv V in $PYTHONUSERBASE/bin."""
    state = load_state()
    if args[:2] != ["-m", "pip"]:
        return 2
    if state.get("no_pip"):
        print("/usr/bin/python3: No module named pip", file=sys.stderr)
        return 1
    if args[2:] == ["--version"]:
        print("pip 22.0.2 from /usr/lib/python3/dist-packages/pip (python 3.10)")
        return 0
    if args[2:5] == ["install", "--user", "--quiet"] and args[5].startswith("uv=="):
        bindir = pathlib.Path(os.environ["PYTHONUSERBASE"]) / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        wrapper(bindir / "uv", "uv")
        state["uv_version"] = args[5].split("==")[1]
        save_state(state)
        return 0
    return 2


def main() -> int:
    name, args = sys.argv[1], sys.argv[2:]
    entry = {"argv": [name, *args]}
    if name == "python3":
        entry["PIP_BREAK_SYSTEM_PACKAGES"] = os.environ.get("PIP_BREAK_SYSTEM_PACKAGES")
    if name != "srun":
        record(**entry)
    return {"gcloud": gcloud, "srun": srun, "uv": uv, "python3": python3, "scontrol": lambda a: 0}[name](args)


if __name__ == "__main__":
    sys.exit(main())
