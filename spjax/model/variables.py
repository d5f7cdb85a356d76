"""The model's non-trainable structure variables, in one place: every `nnx.Variable` that is
not an `nnx.Param`. `nnx.split(model, nnx.Param, ...)` puts them in the train state's
`structure`, which is sharded like the weights they belong to, checkpointed, and never
differentiated. The sparsity and low-rank engines update them; export and accounting read
them through each structure's dense weight.
"""

from __future__ import annotations

from flax import nnx


class SparsityMask(nnx.Variable):
    """bool mask beside the kernel it masks; True = kept. Never differentiated."""


class PrunedScale(nnx.Variable):
    """Scalar factor of the pruned weights in the forward (0 = hard mask; MDGF decays it)."""


class BlockTable(nnx.Variable):
    """int32 block metadata of a block-sparse layer (see pallas_kernels/block_sparse/layout)."""


class DenseGradFlag(nnx.Variable):
    """bool scalar: take the dense straight-through path this step (RigL's regrowth steps)."""


class SparseIndex(nnx.Variable):
    """int32 support of a sparse component (flat indices, or kept channels); never trained."""


class FrozenKernel(nnx.Variable):
    """ReLoRA's W0: a dense kernel outside the optimizer, changed only by merges."""


class SpectralSelection(nnx.Variable):
    """SST: bool (m,), True for the singular-vector pairs trained in the current iteration."""
