"""Multi-process runs: joining the `jax.distributed` cluster, host transfers, agreed stops.

One process per host (or per GPU) runs the same program; each sees only its own devices as
addressable. `initialize()` is called by `spjax train` before anything touches devices. It
joins a cluster when told to by

- our launcher (launch/local.py): SPJAX_COORDINATOR=host:port, SPJAX_NUM_PROCESSES,
  SPJAX_PROCESS_ID (checked first, so the launcher also works inside a SLURM allocation);
- SLURM, for a job step with more than one task (`srun`): JAX reads SLURM's environment.

and does nothing otherwise, so single-process runs are untouched. A cluster that does not
form within SPJAX_INIT_TIMEOUT seconds (default 300) is a one-line error, not a hang: JAX
itself would abort the process with a C++ stack trace at its own deadline.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import jax
import numpy as np

from spjax.errors import SpjaxError

ENV_COORDINATOR = "SPJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SPJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SPJAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "SPJAX_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT_S = 300
# JAX's own deadline comes this much after ours, so our message wins the race.
_JAX_TIMEOUT_MARGIN_S = 30
# How long a process waits at a step for the others before giving up (see step_agreed).
STEP_BARRIER_TIMEOUT_S = 3600
_STOP_KEY = "spjax/stop_at_step"
_SAVE_KEY = "spjax/save_at_step"


class DistributedError(SpjaxError):
    """The multi-process set-up is misconfigured or a peer never arrived."""


def _launcher_args() -> dict[str, Any] | None:
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    present = [n for n in names if os.environ.get(n)]
    if not present:
        return None
    if len(present) != len(names):
        missing = ", ".join(n for n in names if n not in present)
        raise DistributedError(f"{', '.join(present)} set but {missing} missing; set all three "
                               f"(launch/local.py does) or none")
    coordinator = os.environ[ENV_COORDINATOR]
    if ":" not in coordinator:
        raise DistributedError(f"{ENV_COORDINATOR}={coordinator!r} must be host:port")
    try:
        num, pid = int(os.environ[ENV_NUM_PROCESSES]), int(os.environ[ENV_PROCESS_ID])
    except ValueError:
        raise DistributedError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers, got "
                               f"{os.environ[ENV_NUM_PROCESSES]!r} and "
                               f"{os.environ[ENV_PROCESS_ID]!r}") from None
    if not 0 <= pid < num:
        raise DistributedError(f"{ENV_PROCESS_ID}={pid} is not in [0, {ENV_NUM_PROCESSES}={num})")
    # 'deactivate': a launcher inside a SLURM allocation must not have JAX overwrite these
    # (or restrict the visible GPUs) from SLURM's variables.
    return {"coordinator_address": coordinator, "num_processes": num, "process_id": pid,
            "cluster_detection_method": "deactivate"}


def _slurm_tasks() -> int:
    try:
        return int(os.environ.get("SLURM_NTASKS") or 1)
    except ValueError:
        return 1


def _init_timeout() -> int:
    raw = os.environ.get(ENV_INIT_TIMEOUT, str(DEFAULT_INIT_TIMEOUT_S))
    try:
        timeout = int(raw)
    except ValueError:
        timeout = 0
    if timeout < 1:
        raise DistributedError(f"{ENV_INIT_TIMEOUT}={raw!r} must be a positive number of seconds")
    return timeout


def initialize() -> None:
    """Joins the multi-process cluster described by the environment, if any (see module doc)."""
    if jax.distributed.is_initialized():
        return
    args = _launcher_args()
    if args is not None:
        where = f"{args['coordinator_address']} (process {args['process_id']} of " \
                f"{args['num_processes']}, from {ENV_COORDINATOR})"
    elif _slurm_tasks() > 1:
        if not os.environ.get("SLURM_STEP_NODELIST"):
            # In the batch script itself (no job step), SLURM has no per-task environment
            # and only one process runs: JAX's detection fails with an obscure message.
            raise DistributedError(f"SLURM job with {_slurm_tasks()} tasks but this process is "
                                   f"not in a job step; start it with `srun spjax train ...` "
                                   f"(see launch/spjax.sbatch)")
        args = {}  # JAX's SlurmCluster reads SLURM_STEP_NODELIST, SLURM_PROCID, ...
        where = f"SLURM job {os.environ.get('SLURM_JOB_ID')} (task " \
                f"{os.environ.get('SLURM_PROCID')} of {_slurm_tasks()})"
    else:
        return
    timeout = _init_timeout()
    # Cross-process collectives on CPU; gloo is the 0.11 default, named here on purpose.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def give_up() -> None:
        # JAX's connect blocks in C++ (releasing the GIL) and aborts the process at its own
        # deadline; leave first, with one line.
        print(f"spjax: error: the jax.distributed cluster of {where} did not form within "
              f"{timeout}s: the coordinator is unreachable or a process never started; check "
              f"that every process runs and the address is right, or raise {ENV_INIT_TIMEOUT}",
              file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**args, initialization_timeout=timeout
                                   + _JAX_TIMEOUT_MARGIN_S)
    except (ValueError, RuntimeError) as e:
        raise DistributedError(f"jax.distributed.initialize failed for {where}: "
                               f"{' '.join(str(e).split())[:300]}") from None
    finally:
        watchdog.cancel()


def to_host(x: Any) -> np.ndarray:
    """The whole value of `x` as a NumPy array on this host, in any process layout.

    Arrays this process holds entirely (single process, or fully replicated) are read
    locally. Others span devices of other processes and are gathered: a collective, so every
    process must call this for the same array, in the same order.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def fetch(tree: Any) -> Any:
    """`to_host` over a pytree (the multi-process-safe `jax.device_get`)."""
    return jax.tree.map(to_host, tree)


def step_agreed(step: int, local_stop: bool, main_save: bool = False) -> tuple[bool, bool]:
    """(stop, save): whether every process stops after `step`, and whether all save a
    checkpoint at it on the main process's say-so; each process must call this once per
    step.

    A signal (Ctrl-C, SIGTERM from SLURM or the launcher) reaches the processes at slightly
    different steps, but a checkpoint save is collective: all must stop and save at the same
    step, or they deadlock. A process that was signalled publishes its step in the
    coordinator's key-value store *before* it enters the step's barrier; everyone reads the
    key after the barrier, so all see the same value and stop at the same step. Time-based
    saves (train.checkpoint_every_minutes) follow process 0's clock the same way: clocks of
    different hosts would disagree on which step is due. One process needs nothing of this.
    """
    if jax.process_count() == 1:
        return local_stop, main_save
    from jax._src import distributed as jax_distributed  # the client has no public handle

    client = jax_distributed.global_state.client
    if local_stop:
        try:
            client.key_value_set(_STOP_KEY, str(step))
        except jax.errors.JaxRuntimeError:
            pass  # another process proposed first; its step holds
    save_key = f"{_SAVE_KEY}/{step}"
    if main_save and jax.process_index() == 0:
        client.key_value_set(save_key, "1")
    try:
        client.wait_at_barrier("spjax/step", STEP_BARRIER_TIMEOUT_S * 1000)
    except jax.errors.JaxRuntimeError:
        raise DistributedError(f"the other processes did not reach step {step} within "
                               f"{STEP_BARRIER_TIMEOUT_S}s; see their logs") from None
    return _published(client, _STOP_KEY, lambda v: int(v) <= step), \
        _published(client, save_key, lambda v: True)


def _published(client: Any, key: str, test: Any) -> bool:
    try:
        value = client.key_value_try_get(key)
    except jax.errors.JaxRuntimeError:  # NOT_FOUND: nobody published it
        return False
    return test(value)
