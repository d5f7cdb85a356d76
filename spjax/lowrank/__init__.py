"""Low-rank and sparse-plus-low-rank pre-training: config, training engine, GaLore, memory."""
