"""TMA reductions (`copy_smem_to_gmem(..., reduction_op=...)`) for Mosaic GPU's interpreter.

The hardware combines a shared-memory tile into global memory atomically
(`cp.reduce.async.bulk`: add, min/max, signed and unsigned min/max, inc/dec, and/or/xor);
jax 0.11.2's interpreter raises `NotImplementedError("reduction_op not supported")`. Kernels
that sum partial tiles from many programs into one buffer (the fused attention backward's
dQ) could then only be tested on a GPU. `install_tma_reductions()` patches the
interpreter's callback: a copy with a reduction becomes an async task that combines the tile
with its destination under one lock (the hardware's atomicity), by the op's rule in
`COMBINE`; a copy without one runs the interpreter's own code. The race detector still
checks the source read (the tile must be committed before the copy) but not the destination
write: concurrent reductions into one place are the point, and add, min, max and the bitwise
ops do not depend on their order (add up to float rounding). Which dtypes the hardware takes
for each op is checked when a kernel is lowered for the GPU, not here. Everything else about
the copy (its commit group, `wait_smem_to_gmem`) is the interpreter's own task machinery.
A predicate is refused, as the interpreter refuses it on plain copies.

Kernels that reduce call `install_tma_reductions()` when they are built for the interpreter.
"""

from __future__ import annotations

import threading

import jax
import numpy as np

_LOCK = threading.Lock()


def _as_unsigned(x: np.ndarray) -> np.ndarray:
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _as_signed(x: np.ndarray) -> np.ndarray:
    return x.view(np.dtype(f"i{x.dtype.itemsize}"))


def _unsigned_op(fn):
    """fn on the unsigned view of both operands, the result in the destination's dtype."""
    return lambda cur, val: fn(_as_unsigned(cur), _as_unsigned(val)).view(cur.dtype)


def _signed_op(fn):
    return lambda cur, val: fn(_as_signed(cur), _as_signed(val)).view(cur.dtype)


# destination, tile -> new destination, per element (PTX's red/cp.reduce semantics; inc and
# dec are unsigned and wrap at the tile's value: inc counts up to it then restarts at 0)
COMBINE = {
    "add": lambda cur, val: cur + val,
    "min": np.minimum,
    "max": np.maximum,
    "umin": _unsigned_op(np.minimum),
    "umax": _unsigned_op(np.maximum),
    "smin": _signed_op(np.minimum),
    "smax": _signed_op(np.maximum),
    "inc": _unsigned_op(lambda cur, val: np.where(cur >= val, 0, cur + 1).astype(cur.dtype)),
    "dec": _unsigned_op(lambda cur, val: np.where((cur == 0) | (cur > val), val,
                                                  cur - 1).astype(cur.dtype)),
    "and": np.bitwise_and,
    "or": np.bitwise_or,
    "xor": np.bitwise_xor,
}


# what the patch uses of the interpreter's private module (jax 0.11.2)
_NEEDED = ("AsyncCopySmemToGmemTask", "HostAllocationKey", "copy_smem_to_gmem",
           "fail_on_exception", "_get_shared_memory", "_remove_noop_transforms")


def _interpreter():
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    if missing := [name for name in _NEEDED if not hasattr(gpu_callbacks, name)]:
        raise RuntimeError(
            f"pallas_kernels/interpret_reduce.py: jax {jax.__version__}'s Mosaic GPU "
            f"interpreter lacks {', '.join(missing)}; the TMA-reduction patch is written for "
            "jax 0.11.2 (pinned in pyproject.toml): update it, or interpret the attention "
            "backward with MosaicAttentionTiling(fused_backward=False)")
    return gpu_callbacks


def _reduce_task_class(gpu_callbacks):
    base = gpu_callbacks.AsyncCopySmemToGmemTask

    class AsyncReduceSmemToGmemTask(base):
        """SMEM -> GMEM TMA store that combines into the destination (dst = op(dst, src))."""

        def __init__(self, *, combine, **fields):
            super().__init__(**fields)
            self.combine = combine

        def __call__(self, tma_thread_id: int):
            shared_memory = gpu_callbacks._get_shared_memory()
            self.pre_read(tma_thread_id, shared_memory)
            value, _, _ = shared_memory.get_buffer_content(
                self.src_allocation_key, self.src_access, self.thread)
            if value is None or value.shape != self.src_access.shape:
                raise IndexError(f"TMA reduce reads out of bounds: [{self.src_access}]")
            if shared_memory.detect_races:  # the clocks of a store, without its write check
                self.clock.inc(tma_thread_id)
                self.write_clock = self.clock.copy()
            with _LOCK:  # the hardware's reduction is atomic per element
                current, _, _ = shared_memory.get_buffer_content(
                    self.dst_allocation_key, self.dst_access, self.thread)
                if current is None or current.shape != value.shape:
                    raise IndexError(f"TMA reduce writes out of bounds: [{self.dst_access}]")
                current = np.asarray(current)
                value = np.asarray(value).astype(current.dtype)
                combined = np.asarray(self.combine(current, value)).astype(current.dtype)
                shared_memory.store_buffer_content(
                    self.dst_allocation_key, self.dst_access, combined, self.thread)
            self.post_write(tma_thread_id, shared_memory)

    return AsyncReduceSmemToGmemTask


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
        op = str(reduction_op).lower().rsplit(".", 1)[-1]
        if op not in COMBINE:
            raise ValueError(f"TMA reduction_op {reduction_op!r}: not one of {sorted(COMBINE)}")
        if predicate is not None:  # as the interpreter's own copy_smem_to_gmem
            raise NotImplementedError("predicate not supported")
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
            source_info=source_info, clock=clock, combine=COMBINE[op])
        shared_memory.execute_async_task(task)
        return token

    return copy_smem_to_gmem


def _ints(transforms):
    return jax.tree.map(int, transforms)


def install_tma_reductions() -> None:
    """Teach this process's Mosaic GPU interpreter TMA reductions (idempotent, permanent).

    Permanent because the interpreter binds the callback when the kernel is lowered, which
    for a jitted caller happens after its Python call returns. Copies without a reduction
    still run the interpreter's own function, so nothing else changes."""
    gpu_callbacks = _interpreter()
    with _LOCK:
        if getattr(gpu_callbacks.copy_smem_to_gmem, "_spjax_tma_reductions", False):
            return
        patched = _patched_copy(gpu_callbacks, gpu_callbacks.copy_smem_to_gmem,
                                _reduce_task_class(gpu_callbacks))
        patched._spjax_tma_reductions = True
        gpu_callbacks.copy_smem_to_gmem = patched
