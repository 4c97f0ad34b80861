"""Project pipelines."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Register every pipeline under ``pipelines/``; ``__default__`` runs the main job.

    ``batch_selection`` is a separate ~20-minute experiment and is left out of the
    default run so that ``kedro run`` stays within its 5-minute budget on a CPU.
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (p for name, p in pipelines.items() if name not in EXCLUDED_FROM_DEFAULT), Pipeline([])
    )
    return pipelines


EXCLUDED_FROM_DEFAULT = {"batch_selection"}
