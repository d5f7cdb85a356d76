"""Block-sparse linear layer on the Pallas kernels (pallas_kernels/block_sparse).

Like `MaskedLinear` (same kernel and weight-level mask, which the sparsity methods update), plus
the block tables the kernels read (`BlockTable` variables, rebuilt by the sparsity engine only
when the mask changes). All three products skip pruned tiles, so the weight gradient is
already zero there: exactly the masked gradient of hard-mask methods.

RigL needs the *dense* weight gradient on the steps it regrows. On those steps the sparsity
engine sets `dense_grad`, and the layer takes the straight-through dense path of
`MaskedLinear` instead (a `lax.cond`: one step in `update_every` runs dense).

The Pallas kernels are opaque to XLA's partitioner, so under a mesh they run inside
`shard_map`: each device multiplies its own rows (the batch axes) by the whole weight, which
XLA gathers first when it is sharded (FSDP, tensor parallelism), as FSDP gathers any weight
for its matmul; the weight gradient is summed over the batch axes by shard_map's transpose.
Without it XLA would replicate the activations around the kernel call. The plain-jnp path
('xla') is left to the partitioner like any other op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels.block_sparse import block_sparse_matmul
from pallas_kernels.block_sparse.layout import BlockLayout, block_mask_of, build_layout
from spjax import parallel
from spjax.errors import ConfigError, require_gpu
from spjax.model.linear import Axes, LinearSpec, MaskedLinear
from spjax.model.variables import BlockTable, DenseGradFlag


class BlockSparseLinear(MaskedLinear):
    def __init__(self, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, compute_dtype: jnp.dtype, out_dtype: jnp.dtype,
                 rngs: nnx.Rngs, spec: LinearSpec = LinearSpec()):
        super().__init__(d_in, d_out, axes=axes, init_std=init_std, param_dtype=param_dtype,
                         compute_dtype=compute_dtype, out_dtype=out_dtype, rngs=rngs)
        b = spec.block
        if b <= 0 or d_in % b or d_out % b:
            raise ConfigError(f"sparsity.block {b} does not divide a {d_in}x{d_out} layer; "
                              f"choose a block that divides both dimensions")
        self.block = b
        self.implementation = spec.kernel
        layout = build_layout(jnp.ones((d_in // b, d_out // b), bool))
        self.tables = nnx.Dict({name: BlockTable(value, axes=(None,) * value.ndim)
                                for name, value in vars(layout).items()})
        self.dense_grad = DenseGradFlag(jnp.zeros((), bool), axes=())

    def layout(self) -> BlockLayout:
        return BlockLayout(**{name: table[...] for name, table in self.tables.items()})

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.compute_dtype
        # checked here, when the step is traced, not when the model is built: `--dry-run` of a
        # GPU config on a CPU login node still works
        if any(p in ("pallas", "mosaic", "mosaic_ws", "mosaic_stream")
               for p in self.implementation.split(",")):
            require_gpu(f"sparsity.kernel runs GPU kernels ({self.implementation})",
                        "sparsity.kernel=auto (the jnp reference here), interpret or "
                        "mosaic_interpret")

        def sparse(x):
            w = self.kernel[...].astype(c)
            call = functools.partial(block_sparse_matmul, block=self.block,
                                     implementation=self.implementation)
            active = parallel.active()
            if self.implementation == "xla" or active is None or active[0].size == 1:
                return call(x.astype(c), w, self.layout())
            return _over_batch_shards(call, active, x.astype(c), w, self.layout())

        def dense(x):
            return MaskedLinear.__call__(self, x).astype(c)

        return jax.lax.cond(self.dense_grad[...], dense, sparse, x).astype(self.out_dtype)


def _over_batch_shards(call, active, x, w, layout: BlockLayout) -> jax.Array:
    """call(x, w, layout) in shard_map: x's leading (batch) axis split over the mesh's batch
    axes, the weight and its tables whole on every device."""
    mesh, rules = active
    lead = parallel.batch_sharding(mesh, rules).spec[0]
    rows = P(lead, *([None] * (x.ndim - 1)))
    whole = jax.tree.map(lambda _: P(), layout)
    return jax.shard_map(call, mesh=mesh, in_specs=(rows, P(), whole), out_specs=rows,
                         check_vma=False)(x, w, layout)


def tables_for(mask_KxN: jax.Array, block: int) -> dict[str, jax.Array]:
    """The block tables of a weight-level mask (the engine's rebuild after a mask update)."""
    return dict(vars(build_layout(block_mask_of(mask_KxN, block))))
