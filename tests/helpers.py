"""Shared test harness: a program, its sharded state and its jitted train step, without the
training loop (no data pipeline, no checkpoints), so a test can drive steps batch by batch."""

from __future__ import annotations

import jax
import numpy as np

from spjax import parallel
from spjax.config import Config
from spjax.train.state import Program, init_state, state_layout
from spjax.train.step import make_train_step


class TrainHarness:
    """`config`'s program with its state on the first `n_devices` devices (mesh from
    config.parallel) and the jitted train step with the loop's shardings."""

    def __init__(self, config: Config, n_devices: int = 1):
        self.config = config
        self.program = Program.build(config)
        self.mesh = parallel.make_mesh(config.parallel, jax.devices()[:n_devices])
        self.rules = parallel.sharding_rules(config.parallel)
        self.layout = state_layout(self.program, self.mesh, self.rules)
        self.state = init_state(self.program, self.layout, seed=0)
        self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules)
        with parallel.activate(self.mesh, self.rules):
            self._step = jax.jit(make_train_step(self.program),
                                 in_shardings=(self.layout.state, self.batch_sharding),
                                 out_shardings=(self.layout.state, None))

    def global_batch(self, tokens: np.ndarray) -> dict:
        """(B, T + 1) host tokens -> the sharded {inputs, targets} batch."""
        return parallel.host_to_global({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                                       self.batch_sharding)

    def step(self, tokens: np.ndarray) -> dict:
        """One train step on (B, T + 1) tokens; the state advances, the metrics return."""
        batch = self.global_batch(tokens)
        with parallel.activate(self.mesh, self.rules):
            self.state, metrics = self._step(self.state, batch)
        return metrics


def assert_sharded_equals_single(model, tokens, config, rtol: float = 1e-5,
                                 atol: float = 1e-6) -> None:
    """`model`'s logits on `tokens` under config.parallel's mesh (batch sharded as in
    training) equal its single-device logits."""
    single = jax.jit(lambda t: model(t))(tokens)
    mesh = parallel.make_mesh(config.parallel)
    rules = parallel.sharding_rules(config.parallel)
    with parallel.activate(mesh, rules):
        sharded = jax.jit(lambda t: model(t))(
            jax.device_put(tokens, parallel.batch_sharding(mesh, rules)))
    np.testing.assert_allclose(sharded, single, rtol=rtol, atol=atol)
