"""Dense and masked linear layers, and the surface every weight structure shares.

The transformer asks the factory (model/structures.py) for "a linear named `layers/3/mlp/up`
from d_in to d_out whose axes are (embed, mlp)"; the factory picks the weight *structure*
(dense, masked, low-rank, sparse-plus-low-rank, ...) from `assign(name)`, a `LinearSpec`. Every
structure is an nnx.Module built as `cls(d_in, d_out, *, axes, init_std, param_dtype,
compute_dtype, out_dtype, rngs, spec)` with the same surface, so the transformer never changes
when a structure is added:

    __call__(x_BxTxI) -> y_BxTxO     products in `compute_dtype`, fp32 accumulation, `out_dtype` out
    effective_kernel() -> W_IxO      the dense weight the structure represents (tests, export)

Trainable tensors are `nnx.Param`; every variable carries `axes` metadata (logical axis
names) from which parallel.py derives its sharding, so structure tensors added later (masks,
factors) are sharded by the same rules as the kernel they belong to.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from spjax.model.variables import PrunedScale, SparsityMask

Axes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """The structure one linear layer gets (decided per layer name by rules)."""

    structure: str = "dense"  # a key of STRUCTURES
    rank: int = 0  # low-rank structures: r
    alpha: float = 0.0  # low-rank structures with a scale: W = (alpha / r) A B
    density: float = 0.0  # SLTrain: density delta of the random sparse support; LOST: channels
    block: int = 0  # block-sparse kernels: tile size b
    kernel: str = ""  # block-sparse kernels: an implementation of block_sparse_matmul


def normal_init(std: float) -> Callable:
    return jax.nn.initializers.normal(stddev=std)


class DenseLinear(nnx.Module):
    """y = x @ W, no bias (LLaMA)."""

    def __init__(self, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, compute_dtype: jnp.dtype, out_dtype: jnp.dtype,
                 rngs: nnx.Rngs, spec: LinearSpec = LinearSpec()):
        self.compute_dtype = compute_dtype
        self.out_dtype = out_dtype
        self.kernel = nnx.Param(
            normal_init(init_std)(rngs.params(), (d_in, d_out), param_dtype), axes=axes)

    def effective_kernel(self) -> jax.Array:
        return self.kernel[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.effective_kernel().astype(self.compute_dtype)
        # Output in the compute dtype (the GEMM still accumulates in fp32). Asking for an fp32
        # output instead makes the cotangent fp32 and turns both backward GEMMs into fp32/TF32
        # GEMMs: measured on the H200 at 350M, that was 38% of the step.
        y = jnp.einsum("...i,io->...o", x.astype(self.compute_dtype), w)
        return y.astype(self.out_dtype)


class MaskedLinear(DenseLinear):
    """y = x @ W_eff with W_eff = W * (M + (1 - M) * pruned_scale).

    The mask (bool, True = kept) sits beside the kernel with the kernel's axes, so it is
    sharded and checkpointed like it. The forward uses W_eff; the gradient is straight-through
    (dL/dW = dL/dW_eff, dense): what reaches the optimizer is the sparsity method's choice
    (masked for sparse training, dense for STE methods, plus SR-STE/AST decay terms), and RigL
    reads the dense gradient to regrow. Masks start all-True; the method sets them at init.
    """

    def __init__(self, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, compute_dtype: jnp.dtype, out_dtype: jnp.dtype,
                 rngs: nnx.Rngs, spec: LinearSpec = LinearSpec()):
        super().__init__(d_in, d_out, axes=axes, init_std=init_std, param_dtype=param_dtype,
                         compute_dtype=compute_dtype, out_dtype=out_dtype, rngs=rngs)
        self.mask = SparsityMask(jnp.ones((d_in, d_out), bool), axes=axes)
        self.pruned_scale = PrunedScale(jnp.zeros((), jnp.float32), axes=())

    def effective_kernel(self) -> jax.Array:
        kernel = self.kernel[...]
        keep = jnp.where(self.mask[...], 1.0, self.pruned_scale[...]).astype(kernel.dtype)
        return kernel + jax.lax.stop_gradient(kernel * keep - kernel)
