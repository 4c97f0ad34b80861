"""best_minibatch: which mini-batches best approximate the full-batch gradient?"""

import os

# OpenMP threads that spin while waiting make torch 7-13x slower when another process
# shares the cores (measured on the 2-core machines: benchmarks/benchmark_models.py).
# It must be set before torch is first imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
