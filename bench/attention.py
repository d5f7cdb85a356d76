"""Block-sparse attention vs cuDNN / XLA dense attention (GPU): see
pallas_kernels/block_sparse_attention/bench.py.

    python bench/attention.py [--seqs 4096,8192,16384,32768] [--blocks 128,64]
        [--sparsities 0.5,0.75,0.9] [--heads 16 --kv-heads 16 --head-dim 128]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.block_sparse_attention.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
