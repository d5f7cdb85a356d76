"""Shared by the block-sparse attention tests: random inputs and masks, the reference's and
a kernel's outputs and gradients, and how they are compared."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import block_sparse_attention, reference


def random_mask(key, kind, b, h, n, density):
    shape = {"shared": (n, n), "per_head": (h, n, n), "per_sequence_head": (b, h, n, n)}[kind]
    mask = jax.random.uniform(key, shape) < density
    if density < 1:  # an empty query block row (in the causal part: row 1 has 2 tiles)
        mask = mask.at[..., 1, :].set(False)
    return mask


def random_inputs(b, t, h, hkv, d, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (b, t, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def forward_and_backward(attention):
    """(q, k, v, do) -> (O, dQ, dK, dV) of attention(q, k, v), through jax.vjp."""
    def run(q, k, v, do):
        o, vjp = jax.vjp(attention, q, k, v)
        return (o, *vjp(do))

    return run


def reference_grads(q, k, v, mask, do, block, causal):
    """jax.vjp of the plain reference, in float32."""
    @jax.jit
    def run(q, k, v, mask, do):
        return forward_and_backward(lambda q, k, v: reference.attention(
            q, k, v, mask, block=block, causal=causal))(q, k, v, do)

    up = lambda a: a.astype(jnp.float32)  # noqa: E731
    return run(up(q), up(k), up(v), mask, up(do))


def kernel_grads(q, k, v, mask_or_layout, do, block, causal, implementation, mosaic=None):
    return jax.jit(forward_and_backward(lambda q, k, v: block_sparse_attention(
        q, k, v, mask_or_layout, block=block, causal=causal, implementation=implementation,
        mosaic=mosaic)))(q, k, v, do)


def dense_causal_grads(q, k, v, do, implementation="cudnn"):
    """Dense causal attention of jax.nn.dot_product_attention (cuDNN, or "xla")."""
    return jax.jit(forward_and_backward(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation)))(q, k, v, do)


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def empty_rows(mask, b, h, t, block, causal):
    """(B, T, H) bool: query rows with no visible key."""
    full = np.asarray(reference.element_mask(mask, block, causal))  # (Bm, Hm, T, T)
    empty = ~full.any(-1)  # (Bm, Hm, T)
    return np.broadcast_to(np.moveaxis(empty, 1, 2), (b, t, h))


def assert_matches_reference(ours, refs, tolerance: float) -> None:
    """O, dQ, dK, dV: every element written (no NaN) and within `tolerance` relative error."""
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert not np.any(np.isnan(np.asarray(a, np.float32))), name
        assert relative_error(a, r) < tolerance, name


def mosaic_modules(fn, *avals) -> list[str]:
    """The Mosaic GPU kernels of fn lowered for CUDA on this CPU, as module texts (each
    kernel's module is serialized MLIR bytecode inside its custom call)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import dialect as mosaic_gpu_dialect

    lowered = jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call":
                        calls.append(inner.operation)
                    walk(inner.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    texts = []
    for call in calls:
        if "mhlo.backend_config" in call.attributes:
            config = ir.DictAttr(call.attributes["mhlo.backend_config"])
            with mlir.make_ir_context() as context:
                context.allow_unregistered_dialects = True
                mosaic_gpu_dialect.register_dialect(context)
                texts.append(str(ir.Module.parse(ir.StringAttr(config["module"]).value_bytes)))
    return texts
