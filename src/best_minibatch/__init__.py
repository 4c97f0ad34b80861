"""best_minibatch: which mini-batches best approximate the full-batch gradient?"""

__version__ = "0.1.0"
