"""Test setup: 8 forced host devices so sharding, FSDP and expert parallelism run on CPU.

The flag must be set before jax is imported anywhere, hence at the top of conftest. Also the
`slurm` fixture: a real single-node SLURM, shared by the multi-process and sweep tests.
"""

import fcntl
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_conf(server_conf: Path) -> Path:
    """The cluster's slurm.conf for the client commands, with MinJobAge=4.

    `sbatch --wait` polls the job 2 s after submission and then backs off (8 s, 32 s) while
    its wait is below the MinJobAge it reads from its own config: under the cluster's 60 s a
    job that takes 15 s is seen done only at 42 s. With 4 it polls every 2 s. slurmctld
    keeps its own MinJobAge=60, so finished jobs stay queryable as before; the jobs, srun
    and the exit codes `sbatch --wait` returns are unchanged."""
    lines = server_conf.read_text().splitlines()
    assert any(line.startswith("MinJobAge=") for line in lines), "slurm.conf has no MinJobAge"
    client = server_conf.with_name("slurm-client.conf")
    client.write_text("".join(("MinJobAge=4" if line.startswith("MinJobAge=") else line) + "\n"
                              for line in lines))
    return client


@pytest.fixture
def slurm(tmp_path_factory):
    """A single-node SLURM on loopback (launch/slurm_local.sh); skipped, with the reason,
    where it cannot run. Yields the environment for its clients (SLURM_CONF set).

    One cluster at a time across pytest-xdist workers (a file lock): munged is shared by the
    machine, and the cluster whose `start` launched it stops it again, which would cut off a
    cluster started meanwhile by another worker."""
    if os.geteuid() != 0:
        pytest.skip("real SLURM test needs root (it starts munged and slurmd)")
    installed = all(shutil.which(c) for c in ("slurmctld", "slurmd", "munged", "srun"))
    if not installed and not shutil.which("apt-get"):
        pytest.skip("slurm-wlm/munge are not installed and apt-get is not available")
    with open(Path(os.environ.get("TMPDIR", "/tmp")) / "spjax-test-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        directory = tmp_path_factory.mktemp("slurm")
        env = {**os.environ, "SLURM_LOCAL_CTLD_PORT": str(_free_port()),
               "SLURM_LOCAL_SLURMD_PORT": str(_free_port())}
        start = subprocess.run(["bash", "launch/slurm_local.sh", "start", str(directory)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if start.returncode != 0 and not installed:
            pytest.skip(f"could not install or start SLURM: {start.stderr.strip()[-300:]}")
        assert start.returncode == 0, start.stderr
        try:
            yield {**env, "SLURM_CONF": str(_client_conf(directory / "slurm.conf"))}
        finally:
            subprocess.run(["bash", "launch/slurm_local.sh", "stop", str(directory)], cwd=ROOT,
                           env=env, capture_output=True, timeout=120)
