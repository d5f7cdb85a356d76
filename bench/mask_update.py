"""Cost of sparsity mask updates, as a fraction of a training step, measured in one run.

For each method, times the real train step at a step where the method's mask update is due
and at one where it is not, beside the dense step (the baseline), all on the same random
tokens:

    update cost        = step(due) - step(not due)
    amortized overhead = update cost / update_every / step(not due)     target < 2%
    masking overhead   = step(not due) / step(dense) - 1     (masks applied in dense matmuls)

    python bench/mask_update.py --preset 350m --batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from spjax import parallel  # noqa: E402
from spjax.config import load_config  # noqa: E402
from spjax.train.state import Program, init_state, state_layout  # noqa: E402
from spjax.train.step import make_train_step  # noqa: E402

METHODS = {
    "dense": [],
    "rigl": ["sparsity.method=rigl", "sparsity.sparsity=0.8", "sparsity.distribution=erk"],
    "gmp": ["sparsity.method=gmp", "sparsity.sparsity=0.75"],
    # 16 is the largest block dividing the 350M preset's d_ff of 2736
    "rigl-block16": ["sparsity.method=rigl", "sparsity.sparsity=0.75", "sparsity.pattern=block",
                     "sparsity.block=16"],
    "srste-2:4": ["sparsity.method=srste", "sparsity.pattern=nm"],
}


def median_ms(fn, reps: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def due_steps(program: Program) -> tuple[int | None, int]:
    """(a step index whose update is due, the method's update period)."""
    engine = program.sparsity
    if engine is None:
        return None, 1
    for t in range(1, 200_000):
        if bool(engine.method.due(jnp.int32(t))):
            period = next(p for p in range(1, 100_000)
                          if bool(engine.method.due(jnp.int32(t + p))))
            return t, period
    raise ValueError("no due step found")


def bench(name: str, preset: str, seq_len: int, batch: int, reps: int) -> dict:
    config = load_config(None, [f"model={preset}", "model.vocab_size=32000", "train.steps=10000",
                                f"data.seq_len={seq_len}", f"data.batch_size={batch}",
                                *METHODS[name]])
    program = Program.build(config)
    mesh = parallel.make_mesh(config.parallel)
    rules = parallel.sharding_rules(config.parallel)
    layout = state_layout(program, mesh, rules)
    state = init_state(program, layout, seed=0)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    tokens = np.random.default_rng(0).integers(0, 32000, size=(batch, seq_len + 1),
                                               dtype=np.int32)
    arrays = parallel.host_to_global({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                                     batch_sharding)
    with parallel.activate(mesh, rules):
        step = jax.jit(make_train_step(program), in_shardings=(layout.state, batch_sharding),
                       out_shardings=(layout.state, None))  # no donation: state is reused
        step = step.lower(state, arrays).compile()
    due, period = due_steps(program)
    row = {"method": name, "period": period}
    at = lambda t: dataclasses.replace(state, step=jax.device_put(  # noqa: E731
        jnp.int32(t), layout.state.step))
    not_due_state = at(due - 2) if due and period > 1 else state  # t = due - 1 is not due
    row["step_ms"] = median_ms(lambda: step(not_due_state, arrays)[1]["loss"], reps)
    if due is not None and period > 1:
        due_state = at(due - 1)  # the step that completes step `due` runs the update
        row["due_ms"] = median_ms(lambda: step(due_state, arrays)[1]["loss"], reps)
    print(f"[{name}] {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; preset {args.preset}, "
          f"{args.batch} x {args.seq_len} tokens per step", flush=True)
    rows = [bench(m, args.preset, args.seq_len, args.batch, args.reps)
            for m in args.methods.split(",")]
    dense = next((r["step_ms"] for r in rows if r["method"] == "dense"), None)
    print("\n| method | update every | step ms (not due) | step ms (due) | update cost ms | "
          "amortized overhead | masking overhead vs dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "dense":
            print(f"| dense (baseline) | - | {r['step_ms']:.1f} | - | - | - | - |")
            continue
        if r["period"] > 1:
            cost = r["due_ms"] - r["step_ms"]
        else:  # masks recomputed at every step: the whole difference to dense is the update
            r["due_ms"] = r["step_ms"]
            cost = r["step_ms"] - dense if dense else float("nan")
        amortized = cost / r["period"] / r["step_ms"]
        masking = f"{100 * (r['step_ms'] / dense - 1):+.1f}%" if dense else "n/a"
        print(f"| {r['method']} | {r['period']} | {r['step_ms']:.1f} | {r['due_ms']:.1f} | "
              f"{cost:.1f} | {100 * amortized:.2f}% | {masking} |")


if __name__ == "__main__":
    main()
