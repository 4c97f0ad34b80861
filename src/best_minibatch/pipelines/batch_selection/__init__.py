"""``batch_selection``: does training on the "best" mini-batches converge faster than shuffling?

Not part of the default run (about 20 minutes on 2 CPU cores); run it with
``kedro run --pipeline=batch_selection``. See ``docs/batch_selection.md``.
"""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
