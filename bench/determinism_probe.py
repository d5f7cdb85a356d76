"""Which op breaks GPU determinism, or crashes under XLA's deterministic flags: each part of a
train step run twice in one process, the results compared bit for bit.

    python bench/determinism_probe.py                     # default XLA flags
    XLA_FLAGS=--xla_gpu_exclude_nondeterministic_ops=true python bench/determinism_probe.py
    python bench/determinism_probe.py --step model=60m    # also the whole train step, twice

Each line says `identical`, `DIFFER` (how many output arrays) or `CRASH` with the error's
first line. Run it once per flag set (the flags are read when JAX starts).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compare(a: Any, b: Any) -> str:
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    bad = sum(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)
    return "identical" if not bad else f"DIFFER in {bad} of {len(pairs)} arrays"


def probe(name: str, fn: Callable[[], Any]) -> None:
    try:
        first, second = jax.block_until_ready(fn()), jax.block_until_ready(fn())
        print(f"{name}: {compare(first, second)}", flush=True)
    except Exception as e:  # the point is to see which part fails, and how
        print(f"{name}: CRASH {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


def components(vocab: int, d: int, b: int, t: int, heads: int, head_dim: int) -> None:
    key = jax.random.key(0)
    table = jax.random.normal(key, (vocab, d), jnp.float32)
    ids = jax.random.randint(key, (b, t), 0, vocab)
    weight = jax.random.normal(key, (b, t, d))
    embed_grad = jax.jit(jax.grad(lambda e: (jnp.take(e, ids, axis=0) * weight).sum()))
    probe("embedding gradient (scatter-add)", lambda: embed_grad(table))
    q = jax.random.normal(key, (b, t, heads, head_dim), jnp.bfloat16)
    for impl in ("cudnn", "xla"):
        def loss(q, k, v, impl=impl):
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
            return out.astype(jnp.float32).sum()
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        probe(f"attention {impl}, forward and backward", lambda g=grads: g(q, q * 0.5, q * 0.25))
    x = jax.random.normal(key, (b * t, d), jnp.bfloat16)
    w = jax.random.normal(key, (d, 4 * d), jnp.bfloat16)
    matmul = jax.jit(jax.grad(lambda x, w: (x @ w).astype(jnp.float32).sum(), argnums=(0, 1)))
    probe("matmul, forward and backward", lambda: matmul(x, w))
    squares = jax.jit(lambda x: jnp.sum(x.astype(jnp.float32) ** 2))
    probe("global sum of squares", lambda: squares(x))
    values = jnp.array([1, 2, 0, 0])
    scattered = np.asarray(jnp.zeros_like(values).at[jnp.arange(4)].set(values))
    print(f"scatter-set [1 2 0 0] -> {scattered} (jax-ml/jax#27796)", flush=True)


def train_steps(overrides: list[str], steps: int) -> None:
    """The whole jitted train step (donated state, as the loop compiles it), `steps` steps
    from one initial state, twice."""
    from spjax import parallel
    from spjax.config import load_config
    from spjax.data.pipeline import train_iterator
    from spjax.train.session import resolve_config
    from spjax.train.state import Program, init_state, state_layout
    from spjax.train.step import make_train_step

    config, _ = resolve_config(load_config("configs/tiny.yaml", overrides))
    program = Program.build(config)
    mesh = parallel.make_mesh(config.parallel)
    rules = parallel.sharding_rules(config.parallel)
    layout = state_layout(program, mesh, rules)
    sharding = parallel.batch_sharding(mesh, rules)
    data = train_iterator(config.data.path, config.data.seq_len, config.data.batch_size, 0)
    batches = [parallel.host_to_global(next(data), sharding) for _ in range(steps)]
    with parallel.activate(mesh, rules):
        step = jax.jit(make_train_step(program), in_shardings=(layout.state, sharding),
                       out_shardings=(layout.state, None), donate_argnums=0)

    def run() -> tuple[list[Any], Any]:
        state, losses = init_state(program, layout, 0), []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])
        return losses, state.params

    probe(f"train step x{steps} [{' '.join(overrides)}]", run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", nargs="*", metavar="key=value", default=None,
                        help="also probe the whole train step with these overrides")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if jax.default_backend() == "gpu":
        components(vocab=32000, d=768, b=16, t=1024, heads=12, head_dim=64)
    else:
        components(vocab=300, d=32, b=2, t=64, heads=2, head_dim=16)
    if args.step is not None:
        train_steps(["model.vocab_size=0", *args.step], args.steps)


if __name__ == "__main__":
    main()
