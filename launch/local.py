#!/usr/bin/env python3
"""Start N cooperating processes of one command on this machine (jax.distributed).

    python launch/local.py --nproc 2 --cpu --devices-per-proc 4 -- spjax train configs/tiny.yaml
    python launch/local.py --nproc 2 -- spjax train configs/130m.yaml     # 2 processes x 4 GPUs

Every process gets SPJAX_COORDINATOR (a free localhost port), SPJAX_NUM_PROCESSES and
SPJAX_PROCESS_ID, which `spjax train` hands to `jax.distributed.initialize` (spjax/
distributed.py). A leading `spjax` in the command runs `python -m spjax.cli` with this
launcher's interpreter. Devices: with --cpu, each process gets D host CPU devices
(JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D, replacing any
count inherited from the environment); otherwise each process gets its own D GPUs through
CUDA_VISIBLE_DEVICES (D defaults to the GPUs present divided by N).

Output lines are prefixed with the process rank. If a process fails, the others are killed
and the launcher exits with the failed process's code. SIGINT/SIGTERM are forwarded to all
processes once each (Ctrl-C lets a training run save its checkpoint; a second Ctrl-C forwards
a second signal, which makes spjax give up at once).

Standard library only: the launcher itself must not import jax (it would claim the devices).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

KILL_GRACE_S = 5.0  # after a failure, how long the others get between SIGTERM and SIGKILL


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [x for x in visible.split(",") if x.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def child_envs(nproc: int, devices_per_proc: int | None, cpu: bool, port: int,
               base: dict[str, str]) -> list[dict[str, str]]:
    """The environment of each process (raises SystemExit with a one-line reason)."""
    common = {**base, "SPJAX_COORDINATOR": f"127.0.0.1:{port}",
              "SPJAX_NUM_PROCESSES": str(nproc), "PYTHONUNBUFFERED": "1"}
    if cpu:
        count = devices_per_proc or 1
        # Replace, not add to, an inherited count (tests force 8 devices for one process).
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       base.get("XLA_FLAGS", "")).split()
        common["JAX_PLATFORMS"] = "cpu"
        common["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
        return [{**common, "SPJAX_PROCESS_ID": str(r)} for r in range(nproc)]
    gpus = _gpu_ids()
    per = devices_per_proc or (len(gpus) // nproc if gpus else 0)
    if per < 1 or per * nproc > len(gpus):
        sys.exit(f"launch/local.py: error: {nproc} process(es) x {per or '?'} GPU(s) but "
                 f"{len(gpus)} GPU(s) visible; pass --devices-per-proc, fewer --nproc, or --cpu")
    return [{**common, "SPJAX_PROCESS_ID": str(r),
             "CUDA_VISIBLE_DEVICES": ",".join(gpus[r * per:(r + 1) * per])}
            for r in range(nproc)]


def _die_with_parent() -> None:
    # Children live in their own sessions (so a terminal's Ctrl-C reaches them once, through
    # us); if the launcher is killed outright, they must not train on unattended.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pump(stream: IO[bytes], out: IO[str], prefix: str, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with lock:
            out.write(f"{prefix}{line}\n")
            out.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(command: Sequence[str], envs: list[dict[str, str]]) -> int:
    if command and command[0] == "spjax":
        command = [sys.executable, "-m", "spjax.cli", *command[1:]]
    procs: list[subprocess.Popen] = []
    for env in envs:
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, start_new_session=True,
                                      preexec_fn=_die_with_parent))
    lock = threading.Lock()
    width = len(str(len(procs) - 1))
    pumps = []
    for rank, p in enumerate(procs):
        prefix = f"[{rank:>{width}}] "
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, out, prefix, lock), daemon=True)
            t.start()
            pumps.append(t)

    signalled: list[int] = []

    def forward(signum: int, frame: object) -> None:
        signalled.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failure: int | None = None
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            # After a forwarded signal, processes exit on their own once the checkpoint is
            # saved; killing the slower ones then could lose it.
            if failed and failure is None and not signalled:
                failure = _exit_code(failed[0].returncode)
                rank = procs.index(failed[0])
                with lock:
                    print(f"launch/local.py: process {rank} exited with code {failure}; "
                          f"stopping the others", file=sys.stderr, flush=True)
                _kill_all(procs)
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _kill_all(procs)
        for t in pumps:
            t.join(timeout=5)
    if failure is not None:
        return failure
    codes = [_exit_code(p.returncode) for p in procs]
    return next((c for c in codes if c), 0)


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM then, after a grace period, SIGKILL to every live process group."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.time() + KILL_GRACE_S
    while time.time() < deadline and any(p.poll() is None for p in live):
        time.sleep(0.05)
    for p in live:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(p.pid, signum)  # the process and its own children (grain workers)
    except ProcessLookupError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="launch/local.py", usage="%(prog)s --nproc N [--devices-per-proc D] [--cpu] "
        "[--port P] -- COMMAND ...", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, required=True, help="number of processes")
    parser.add_argument("--devices-per-proc", type=int, default=None, metavar="D",
                        help="devices per process (CPU default 1; GPU default all / N)")
    parser.add_argument("--cpu", action="store_true", help="run on host CPU devices")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    if "--" not in argv:
        parser.error("put the command after `--`, e.g. -- spjax train configs/tiny.yaml")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command after `--`")
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc} must be at least 1")
    if args.devices_per_proc is not None and args.devices_per_proc < 1:
        parser.error(f"--devices-per-proc {args.devices_per_proc} must be at least 1")
    envs = child_envs(args.nproc, args.devices_per_proc, args.cpu, args.port or free_port(),
                      dict(os.environ))
    return launch(command, envs)


if __name__ == "__main__":
    sys.exit(main())
