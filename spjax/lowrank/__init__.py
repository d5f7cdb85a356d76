"""Low-rank and sparse-plus-low-rank pre-training: where each piece lives.

The structures are model layers, so they sit in the model package (the engine here drives
them, and the model may not import this package):

    spjax/model/lowrank.py          low-rank, SLTrain, LOST, SST and ReLoRA linears
    spjax/model/experts_lowrank.py  the same per expert of an MoE stack
    spjax/model/variables.py        their non-trained state (SparseIndex, FrozenKernel, ...)
    spjax/config/lowrank.py         the `lowrank:` config section
    engine.py (here)                finds those layers, SST resampling, ReLoRA merges and
                                    re-warm-ups, refactorization, optimizer resets
    galore.py (here)                GaLore: an optax transformation projecting gradients
"""
