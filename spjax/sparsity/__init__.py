"""Sparse pre-training: methods and the engine that applies them to the model's masks.

    spjax/model/linear.py, experts.py  masked linears and expert stacks (the structures)
    spjax/model/blocksparse.py         the block-sparse linear on the Pallas kernels
    spjax/model/variables.py           SparsityMask, PrunedScale, BlockTable, ...
    spjax/config/sparsity.py           the `sparsity:` config section
    masks.py (here)                    mask selection (top-k, N:M, blocks), ERK densities
    schedules.py, methods.py (here)    when and how masks change, one class per method
    engine.py (here)                   ties a method to the train state's masks and moments
    spjax/train/accounting.py          non-zero parameters and FLOPs as the masks change
"""
