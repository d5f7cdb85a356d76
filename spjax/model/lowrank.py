"""Low-rank and sparse-plus-low-rank weight structures, and the pure updates their methods use.

A kernel is W_IxO (d_in, d_out) with y = x @ W, so PyTorch's W(out, in) = B(out, r) A(r, in)
is here W_IxO = A_IxR @ B_RxO. Each class has the surface of linear.py (`__call__`,
`effective_kernel`); factors carry axes (kernel axis, "rank") so they shard like their kernel.

  lowrank  LowRankLinear   W = (alpha/r) A B                  (GaLore's "Low-Rank" baseline)
  sltrain  SLTrainLinear   W = (alpha/r) A B + S, S on a fixed uniformly random support
  relora   ReLoRALinear    W = W0 + (alpha/r) A B, W0 frozen; `relora_merge` folds A B into W0
  lost     LOSTLinear      W = A B + channel-wise sparse S (SVD init, below)
  sst      SSTLinear       W = U diag(s) V, r singular-vector pairs trained per step

LOST (Li et al. 2025) construction. The paper's code was not available; this follows the
abstract ("SVD of the weight, dominant low-rank components kept, the remaining singular values
allocated to channel-wise sparse components") and a third-party LOST-style init
(nanguoyu/Foldable-Sparse-and-Low-Rank-Pretraining, fosl_model.py), and is flagged as such:
  1. draw a dense W0 ~ N(0, init_std^2) (the first draw from `rngs.params()`);
  2. SVD W0 = U diag(s) V^T; A = U_r diag(sqrt(s_r)), B = diag(sqrt(s_r)) V_r^T (top r):
     the dominant spectrum lives in the factors, split evenly between them;
  3. residual R = W0 - A B; channel importance = L2 norm of each output channel (a column of R
     in our (in, out) layout); keep the k = max(1, round(density * d_out)) most energetic ones;
  4. S (d_in, k) = R[:, channels], channels a sorted int32 `SparseIndex`.
So at init the layer equals W0 exactly on the kept channels and its rank-r approximation
elsewhere. Forward: y = x A B, plus x S added into the kept output columns. No alpha/r scale:
the factors carry the singular values.

Every init is shape-static and uses only jax.random (it runs under nnx.eval_shape and jax.jit).
SVDs run in fp32.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from spjax.errors import ConfigError
from spjax.model.linear import Axes, LinearSpec, normal_init
from spjax.model.variables import FrozenKernel, SparseIndex, SpectralSelection


# ----------------------------------------------------------------------------- helpers


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int,
                    dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """PyTorch's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), +1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _dot(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x @ w with operands and output in `dtype` (the GEMM still accumulates in fp32). Never an
    fp32 output from half inputs: its cotangent would be fp32 and turn both backward GEMMs into
    fp32/TF32 GEMMs (38% of the 350M step on the H200, see DenseLinear)."""
    return jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype))


def _check_rank(kind: str, d_in: int, d_out: int, rank: int) -> int:
    if not 1 <= rank <= min(d_in, d_out):
        raise ConfigError(
            f"{kind} layer {d_in}x{d_out}: lowrank.rank={rank} must lie in [1, "
            f"{min(d_in, d_out)}] (min of its dims); lower lowrank.rank or mark the layer "
            f"dense in lowrank.rules")
    return rank


def _check_alpha(kind: str, d_in: int, d_out: int, alpha: float) -> float:
    if not alpha > 0:
        raise ConfigError(f"{kind} layer {d_in}x{d_out}: lowrank.alpha={alpha} must be > 0 "
                          f"(W = (alpha/r) A B would be zero); set lowrank.alpha, e.g. 16")
    return alpha


def _check_density(kind: str, d_in: int, d_out: int, density: float) -> float:
    if not 0.0 < density < 1.0:
        raise ConfigError(f"{kind} layer {d_in}x{d_out}: lowrank.density={density} must lie "
                          f"in (0, 1); set lowrank.density, e.g. 0.03")
    return density


def sltrain_nnz(d_in: int, d_out: int, density: float) -> int:
    """Entries of SLTrain's random support in one d_in x d_out matrix: floor(delta d_in d_out),
    at least one, addressable by int32 flat indices."""
    density = _check_density("sltrain", d_in, d_out, density)
    nnz = math.floor(density * d_in * d_out)
    if nnz < 1 or d_in * d_out >= 2**31:
        raise ConfigError(f"sltrain layer {d_in}x{d_out}: lowrank.density={density} gives "
                          f"{nnz} sparse entries (need >= 1, int32 flat indices); raise "
                          f"lowrank.density or mark the layer dense in lowrank.rules")
    return nnz


def _svd(w_IxO: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD in fp32: (U (I, m), s (m,) descending, Vt (m, O)), m = min(I, O)."""
    return jnp.linalg.svd(w_IxO.astype(jnp.float32), full_matrices=False)


class _Structure(nnx.Module):
    """Dtypes and the shared surface; subclasses define `_kernel(dtype)` and may override
    `__call__` with a cheaper path than materializing W."""

    def _dtypes(self, param_dtype, compute_dtype, out_dtype) -> None:
        self.param_dtype, self.compute_dtype, self.out_dtype = param_dtype, compute_dtype, out_dtype

    # W in `dtype`, defined by every subclass (lowrank, SLTrain, ReLoRA, LOST, SST); only
    # declared here, so a subclass without it is an AttributeError naming `_kernel`.
    _kernel: Callable[[jnp.dtype], jax.Array]

    def effective_kernel(self) -> jax.Array:
        return self._kernel(self.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _dot(x, self._kernel(self.compute_dtype), self.compute_dtype).astype(self.out_dtype)


# ----------------------------------------------------------------------------- structures


class LowRankLinear(_Structure):
    """W = (alpha/r) A B; both factors kaiming-uniform (the benchmark repo's low-rank model)."""

    def __init__(self, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, compute_dtype: jnp.dtype, out_dtype: jnp.dtype,
                 rngs: nnx.Rngs, spec: LinearSpec):
        del init_std  # the factors' init is fixed by their fan-in
        r = _check_rank("lowrank", d_in, d_out, spec.rank)
        self.scale = _check_alpha("lowrank", d_in, d_out, spec.alpha) / r
        self._dtypes(param_dtype, compute_dtype, out_dtype)
        self.a = nnx.Param(kaiming_uniform(rngs.params(), (d_in, r), d_in, param_dtype),
                           axes=(axes[0], "rank"))
        self.b = nnx.Param(kaiming_uniform(rngs.params(), (r, d_out), r, param_dtype),
                           axes=("rank", axes[1]))

    def _kernel(self, dtype: jnp.dtype) -> jax.Array:
        return _dot(self.a[...] * self.scale, self.b[...], dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Through the factors, never a dense W; the scale goes on the smallest tensor.
        h = _dot(x, self.a[...] * self.scale, self.compute_dtype)
        return _dot(h, self.b[...], self.compute_dtype).astype(self.out_dtype)


class SLTrainLinear(_Structure):
    """W = (alpha/r) A B + S; S is `values` at the sorted flat positions `index` of a support
    drawn uniformly at random once (nnz = floor(density d_in d_out)) and never changed.

    Init as the SLTrain code: B = 0 (the layer starts as S alone), A and the values
    U(-1/sqrt(d_in), 1/sqrt(d_in)). Forward as its kernel: materialize W, scatter-add the values,
    one GEMM; autodiff gives the values the gather of dL/dW at the support.
    """

    def __init__(self, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, compute_dtype: jnp.dtype, out_dtype: jnp.dtype,
                 rngs: nnx.Rngs, spec: LinearSpec):
        del init_std
        r = _check_rank("sltrain", d_in, d_out, spec.rank)
        self.scale = _check_alpha("sltrain", d_in, d_out, spec.alpha) / r
        nnz = sltrain_nnz(d_in, d_out, spec.density)
        self.shape = (d_in, d_out)
        self._dtypes(param_dtype, compute_dtype, out_dtype)
        self.a = nnx.Param(kaiming_uniform(rngs.params(), (d_in, r), d_in, param_dtype),
                           axes=(axes[0], "rank"))
        self.b = nnx.Param(jnp.zeros((r, d_out), param_dtype), axes=("rank", axes[1]))
        support = jax.random.permutation(rngs.params(), d_in * d_out)[:nnz]
        self.index = SparseIndex(jnp.sort(support).astype(jnp.int32), axes=(None,))
        self.values = nnx.Param(kaiming_uniform(rngs.params(), (nnz,), d_in, param_dtype),
                                axes=(None,))

    def _kernel(self, dtype: jnp.dtype) -> jax.Array:
        w_IxO = _dot(self.a[...] * self.scale, self.b[...], dtype)
        flat = w_IxO.reshape(-1).at[self.index[...]].add(self.values[...].astype(dtype))
        return flat.reshape(self.shape)


class ReLoRALinear(_Structure):
    """W = W0 + (alpha/r) A B with W0 frozen (N(0, init_std)); A kaiming-uniform, B = 0, so the
    layer starts as the dense init. Merges (`relora_merge`) are the training engine's job."""

    def __init__(self, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, compute_dtype: jnp.dtype, out_dtype: jnp.dtype,
                 rngs: nnx.Rngs, spec: LinearSpec):
        r = _check_rank("relora", d_in, d_out, spec.rank)
        self.scale = _check_alpha("relora", d_in, d_out, spec.alpha) / r
        self._dtypes(param_dtype, compute_dtype, out_dtype)
        self.w0 = FrozenKernel(normal_init(init_std)(rngs.params(), (d_in, d_out), param_dtype),
                               axes=axes)
        self.a = nnx.Param(kaiming_uniform(rngs.params(), (d_in, r), d_in, param_dtype),
                           axes=(axes[0], "rank"))
        self.b = nnx.Param(jnp.zeros((r, d_out), param_dtype), axes=("rank", axes[1]))

    def _kernel(self, dtype: jnp.dtype) -> jax.Array:
        return self.w0[...].astype(dtype) + _dot(self.a[...] * self.scale, self.b[...], dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # LoRA's path: W0 is frozen, so no dense dL/dW is ever formed; only dx goes through W0.
        c = self.compute_dtype
        w0 = jax.lax.stop_gradient(self.w0[...])
        y = _dot(x, w0, c) + _dot(_dot(x, self.a[...] * self.scale, c), self.b[...], c)
        return y.astype(self.out_dtype)


def _lost_split(w0_IxO: jax.Array, r: int, k: int):
    """(A, B, S, channels) of the LOST construction (module docstring), in fp32."""
    u, s, vt = _svd(w0_IxO)
    root = jnp.sqrt(s[:r])
    a_IxR, b_RxO = u[:, :r] * root[None, :], root[:, None] * vt[:r]
    residual_IxO = w0_IxO.astype(jnp.float32) - a_IxR @ b_RxO
    _, top = jax.lax.top_k(jnp.linalg.norm(residual_IxO, axis=0), k)
    channels = jnp.sort(top).astype(jnp.int32)
    return a_IxR, b_RxO, residual_IxO[:, channels], channels


class LOSTLinear(_Structure):
    """y = x A B + scatter_cols(x S, channels): LOST's SVD-initialized factors plus a
    channel-wise sparse complement (module docstring). Channels are fixed after init."""

    def __init__(self, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, compute_dtype: jnp.dtype, out_dtype: jnp.dtype,
                 rngs: nnx.Rngs, spec: LinearSpec):
        r = _check_rank("lost", d_in, d_out, spec.rank)
        k = max(1, round(_check_density("lost", d_in, d_out, spec.density) * d_out))
        self._dtypes(param_dtype, compute_dtype, out_dtype)
        w0_IxO = normal_init(init_std)(rngs.params(), (d_in, d_out), jnp.float32)
        a_IxR, b_RxO, s_IxK, channels = _lost_split(w0_IxO, r, k)
        self.a = nnx.Param(a_IxR.astype(param_dtype), axes=(axes[0], "rank"))
        self.b = nnx.Param(b_RxO.astype(param_dtype), axes=("rank", axes[1]))
        self.values = nnx.Param(s_IxK.astype(param_dtype), axes=(axes[0], None))
        self.channels = SparseIndex(channels, axes=(None,))

    def _kernel(self, dtype: jnp.dtype) -> jax.Array:
        w_IxO = _dot(self.a[...], self.b[...], dtype)
        return w_IxO.at[:, self.channels[...]].add(self.values[...].astype(dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.compute_dtype
        y = _dot(_dot(x, self.a[...], c), self.b[...], c)
        y = y.at[..., self.channels[...]].add(_dot(x, self.values[...], c))
        return y.astype(self.out_dtype)


class SSTLinear(_Structure):
    """y = ((x U) * s) V from the SVD of a dense N(0, init_std) init (m = min(d_in, d_out)
    pairs, all stored). `selection` marks the r pairs trained this iteration (init: the r
    largest); the engine resamples it (`sst_sample`) and shapes gradients (`sst_enhanced_grads`).
    """

    def __init__(self, d_in: int, d_out: int, *, axes: Axes, init_std: float,
                 param_dtype: jnp.dtype, compute_dtype: jnp.dtype, out_dtype: jnp.dtype,
                 rngs: nnx.Rngs, spec: LinearSpec):
        r = _check_rank("sst", d_in, d_out, spec.rank)
        self._dtypes(param_dtype, compute_dtype, out_dtype)
        u_IxM, s_M, v_MxO = _svd(normal_init(init_std)(rngs.params(), (d_in, d_out), jnp.float32))
        self.u = nnx.Param(u_IxM.astype(param_dtype), axes=(axes[0], "rank"))
        self.s = nnx.Param(s_M.astype(param_dtype), axes=(None,))
        self.v = nnx.Param(v_MxO.astype(param_dtype), axes=("rank", axes[1]))
        self.selection = SpectralSelection(jnp.arange(s_M.shape[0]) < r, axes=(None,))

    def _kernel(self, dtype: jnp.dtype) -> jax.Array:
        return _dot(self.u[...] * self.s[...][None, :], self.v[...], dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.compute_dtype
        h = _dot(x, self.u[...], c) * self.s[...].astype(c)
        return _dot(h, self.v[...], c).astype(self.out_dtype)


# ----------------------------------------------------------------------------- pure updates


def refactorize(a_IxR: jax.Array, b_RxO: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Balanced refactorization (Glentis et al. 2025): with A B = U S V^T (rank r),
    A <- U sqrt(S), B <- sqrt(S) V^T. Same product, A^T A = B B^T = S.

    The SVD of A B is taken through thin QRs of A and B^T and an r x r core, never forming
    the dense (d_in, d_out) product: O((d_in + d_out) r^2) instead of O(d_in d_out r)."""
    q_a, r_a = jnp.linalg.qr(a_IxR.astype(jnp.float32))
    q_b, r_b = jnp.linalg.qr(b_RxO.astype(jnp.float32).T)
    u, s, vt = jnp.linalg.svd(r_a @ r_b.T, full_matrices=False)
    root = jnp.sqrt(s)
    a_new = (q_a @ u) * root[None, :]
    b_new = root[:, None] * (vt @ q_b.T)
    return a_new.astype(a_IxR.dtype), b_new.astype(b_RxO.dtype)


def relora_merge(w0_IxO: jax.Array, a_IxR: jax.Array, b_RxO: jax.Array, scale: float,
                 key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ReLoRA merge: W0 <- W0 + scale A B, A <- kaiming-uniform(key), B <- 0 (the layer's
    function is unchanged; the engine resets the factors' optimizer moments)."""
    merged = w0_IxO.astype(jnp.float32) + scale * (a_IxR.astype(jnp.float32)
                                                   @ b_RxO.astype(jnp.float32))
    a_new = kaiming_uniform(key, a_IxR.shape, a_IxR.shape[0], a_IxR.dtype)
    return merged.astype(w0_IxO.dtype), a_new, jnp.zeros_like(b_RxO)


# Floor for |s_i| when SST divides a gradient by it. Autodiff gives column i of dL/dU exactly
# s_i (dL/dW V_i), so the quotient is exact for any s_i != 0; the floor only keeps s_i = 0 from
# producing 0/0.
_S_FLOOR = 1e-6


def sst_sample(s_M: jax.Array, r: int, key: jax.Array) -> jax.Array:
    """bool (m,) with exactly r True: r distinct indices drawn without replacement (successive
    draws, as torch.multinomial) with p_i = 1/2 (1/m + s_i / sum(s)); s is clamped at 0."""
    m = s_M.shape[0]
    s = jnp.maximum(s_M.astype(jnp.float32), 0.0)
    p = 0.5 * (1.0 / m + s / jnp.maximum(s.sum(), jnp.finfo(jnp.float32).tiny))
    picked = jax.random.choice(key, m, (r,), replace=False, p=p)
    return jnp.zeros((m,), bool).at[picked].set(True)


def sst_enhanced_grads(grad_u_IxM: jax.Array, grad_s_M: jax.Array, grad_v_MxO: jax.Array,
                       s_M: jax.Array, selection_M: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SST's gradients: selected columns of U / rows of V get dL/dW V_i / U_i^T dL/dW (the
    autodiff gradient divided by s_i), unselected ones 0; every singular value keeps its
    gradient U_i^T dL/dW V_i."""
    s = s_M.astype(jnp.float32)
    s_safe = jnp.where(s < 0, jnp.minimum(s, -_S_FLOOR), jnp.maximum(s, _S_FLOOR))
    gu = jnp.where(selection_M[None, :], grad_u_IxM.astype(jnp.float32) / s_safe[None, :], 0.0)
    gv = jnp.where(selection_M[:, None], grad_v_MxO.astype(jnp.float32) / s_safe[:, None], 0.0)
    return gu.astype(grad_u_IxM.dtype), grad_s_M, gv.astype(grad_v_MxO.dtype)


def sst_renormalize(u_IxM: jax.Array, s_M: jax.Array, v_MxO: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unit-norm columns of U and rows of V, their norms folded into s (same U diag(s) V)."""
    tiny = jnp.finfo(jnp.float32).tiny
    norm_u = jnp.maximum(jnp.linalg.norm(u_IxM.astype(jnp.float32), axis=0), tiny)
    norm_v = jnp.maximum(jnp.linalg.norm(v_MxO.astype(jnp.float32), axis=1), tiny)
    return ((u_IxM / norm_u[None, :]).astype(u_IxM.dtype),
            (s_M * norm_u * norm_v).astype(s_M.dtype),
            (v_MxO / norm_v[:, None]).astype(v_MxO.dtype))


def sst_reorthogonalize(u_IxM: jax.Array, s_M: jax.Array, v_MxO: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Re-SVD of U diag(s) V (fp32): the same matrix with orthonormal U, V and s descending."""
    w_IxO = (u_IxM.astype(jnp.float32) * s_M.astype(jnp.float32)[None, :]) @ v_MxO.astype(
        jnp.float32)
    u, s, vt = _svd(w_IxO)
    return u.astype(u_IxM.dtype), s.astype(s_M.dtype), vt.astype(v_MxO.dtype)
