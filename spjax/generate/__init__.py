"""Text generation from trained models: jitted prefill and KV-cache decode steps over the
model's own modules (decode.py), next-token choice (sampling.py), and the batched loop
behind `spjax generate` (generator.py)."""
