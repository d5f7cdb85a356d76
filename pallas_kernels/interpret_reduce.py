"""TMA reduce-add (`copy_smem_to_gmem(..., reduction_op="add")`) for Mosaic GPU's interpreter.

The hardware adds a shared-memory tile into global memory atomically (`cp.reduce.async.bulk`);
jax 0.11.2's interpreter raises `NotImplementedError("reduction_op not supported")`. Kernels
that sum partial tiles from many programs into one buffer (the fused attention backward's
dQ) could then only be tested on a GPU. `install_reduce_add()` patches the interpreter's
callback: a copy with a reduction becomes an async task that adds the tile into its
destination under one lock (the hardware's atomicity); a copy without one runs the
interpreter's own code. The race detector still checks the source
read (the tile must be committed before the copy) but not the destination write: concurrent
reduce-adds into one place are the point, and their sum does not depend on their order up to
float rounding. Everything else about the copy (its commit group, `wait_smem_to_gmem`) is
the interpreter's own task machinery.

Kernels that reduce call `install_reduce_add()` when they are built for the interpreter.
"""

from __future__ import annotations

import threading

import jax
import numpy as np

_LOCK = threading.Lock()


# what the patch uses of the interpreter's private module (jax 0.11.2)
_NEEDED = ("AsyncCopySmemToGmemTask", "HostAllocationKey", "copy_smem_to_gmem",
           "fail_on_exception", "_get_shared_memory", "_remove_noop_transforms")


def _interpreter():
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    if missing := [name for name in _NEEDED if not hasattr(gpu_callbacks, name)]:
        raise RuntimeError(
            f"pallas_kernels/interpret_reduce.py: jax {jax.__version__}'s Mosaic GPU "
            f"interpreter lacks {', '.join(missing)}; the reduce-add patch is written for "
            "jax 0.11.2 (pinned in pyproject.toml): update it, or interpret the attention "
            "backward with MosaicAttentionTiling(fused_backward=False)")
    return gpu_callbacks


def _reduce_add_task_class(gpu_callbacks):
    base = gpu_callbacks.AsyncCopySmemToGmemTask

    class AsyncReduceAddSmemToGmemTask(base):
        """SMEM -> GMEM TMA store that adds into the destination (dst += src)."""

        def __call__(self, tma_thread_id: int):
            shared_memory = gpu_callbacks._get_shared_memory()
            self.pre_read(tma_thread_id, shared_memory)
            value, _, _ = shared_memory.get_buffer_content(
                self.src_allocation_key, self.src_access, self.thread)
            if value is None or value.shape != self.src_access.shape:
                raise IndexError(f"reduce-add reads out of bounds: [{self.src_access}]")
            if shared_memory.detect_races:  # the clocks of a store, without its write check
                self.clock.inc(tma_thread_id)
                self.write_clock = self.clock.copy()
            with _LOCK:  # the hardware's reduction is atomic per element
                current, _, _ = shared_memory.get_buffer_content(
                    self.dst_allocation_key, self.dst_access, self.thread)
                if current is None or current.shape != value.shape:
                    raise IndexError(f"reduce-add writes out of bounds: [{self.dst_access}]")
                total = (np.asarray(current) + np.asarray(value)).astype(current.dtype)
                shared_memory.store_buffer_content(
                    self.dst_allocation_key, self.dst_access, total, self.thread)
            self.post_write(tma_thread_id, shared_memory)

    return AsyncReduceAddSmemToGmemTask


def _patched_copy(gpu_callbacks, original, task_class):
    @gpu_callbacks.fail_on_exception
    def copy_smem_to_gmem(*, token, mesh_location, thread, src_allocation_key_as_array,
                          src_transforms, dst_allocation_key_as_array, dst_transforms,
                          predicate, source_info, commit_group, reduction_op):
        if reduction_op is None:
            return original.__wrapped__(
                token=token, mesh_location=mesh_location, thread=thread,
                src_allocation_key_as_array=src_allocation_key_as_array,
                src_transforms=src_transforms,
                dst_allocation_key_as_array=dst_allocation_key_as_array,
                dst_transforms=dst_transforms, predicate=predicate, source_info=source_info,
                commit_group=commit_group, reduction_op=reduction_op)
        if str(reduction_op).lower().rsplit(".", 1)[-1] != "add":
            raise NotImplementedError(f"interpreted reduce {reduction_op}: only add")
        if predicate is not None:
            raise NotImplementedError("interpreted reduce-add with a predicate")
        key = gpu_callbacks.HostAllocationKey
        src_key = key.from_array(src_allocation_key_as_array)
        dst_key = key.from_array(dst_allocation_key_as_array)
        src_transforms = _ints(gpu_callbacks._remove_noop_transforms(src_transforms))
        dst_transforms = _ints(gpu_callbacks._remove_noop_transforms(dst_transforms))
        shared_memory = gpu_callbacks._get_shared_memory()
        clock = shared_memory.incr_clock(thread) if shared_memory.detect_races else None
        task = task_class(
            mesh_location=mesh_location, thread=thread, src_allocation_key=src_key,
            src_access=shared_memory.access(src_key, src_transforms),
            dst_allocation_key=dst_key,
            dst_access=shared_memory.access(dst_key, dst_transforms),
            source_info=source_info, clock=clock)
        shared_memory.execute_async_task(task)
        return token

    return copy_smem_to_gmem


def _ints(transforms):
    return jax.tree.map(int, transforms)


def install_reduce_add() -> None:
    """Teach this process's Mosaic GPU interpreter TMA reduce-add (idempotent, permanent).

    Permanent because the interpreter binds the callback when the kernel is lowered, which
    for a jitted caller happens after its Python call returns. Copies without a reduction
    still run the interpreter's own function, so nothing else changes."""
    gpu_callbacks = _interpreter()
    with _LOCK:
        if getattr(gpu_callbacks.copy_smem_to_gmem, "_spjax_reduce_add", False):
            return
        patched = _patched_copy(gpu_callbacks, gpu_callbacks.copy_smem_to_gmem,
                                _reduce_add_task_class(gpu_callbacks))
        patched._spjax_reduce_add = True
        gpu_callbacks.copy_smem_to_gmem = patched
