"""Block-sparse kernels vs XLA dense (GPU): see pallas_kernels/block_sparse/bench.py.

    python bench/block_sparse.py [--shapes 8192x4096x4096,...] [--blocks 64,128]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.block_sparse.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
