"""Kedro project settings."""

import warnings

from kedro.config import OmegaConfigLoader

from best_minibatch.kedro_glue.hooks import ProjectRoot, RunChecks, RunLog
from best_minibatch.kedro_glue.run_hooks import RunRecord
from best_minibatch.kedro_glue.runner import DaskConfig
from best_minibatch.kedro_glue.tracking import RunTracking

# Every parameter and input of a run is checked before its first node (docs/reliability.md).
# RunRecord pins every input to the last completed run's versions (first of all hooks) and its
# lock_hook lets one run at a time use the data folder (last, once every check has passed):
# docs/data_flow.md, "Which versions a run reads". RunTracking records the run in MLflow
# (docs/tracking.md); the last hook registered of those marked trylast is the last called, so
# the MLflow run starts once the run holds the lock.
# DaskConfig hands conf/<env>/dask.yml to `--runner=best_minibatch.kedro_glue.runner.DaskRunner` (docs/scaling.md).
_RUN_RECORD = RunRecord()
# ProjectRoot (registered last, tryfirst: the first hook called) makes the project root the working directory,
# so parameters' relative paths resolve there wherever kedro was started (docs/reliability.md).
# RunLog: logs/info.log keeps every record; the terminal leaves out the per-dataset load/save lines.
HOOKS = (RunChecks(), _RUN_RECORD, _RUN_RECORD.lock_hook, RunTracking(), DaskConfig(), ProjectRoot(), RunLog())

# kedro-viz writes a .viz/ folder on every run through its hooks; runs don't need it.
# kedro-mlflow's own hook is driven by RunTracking (which never lets tracking fail a run).
DISABLE_HOOKS_FOR_PLUGINS = ("kedro-viz", "kedro_mlflow")

# Keep a run's log for what a user can act on (the one loud warning of a skipped metric):
# Kedro 1.7's config loader calls a deprecated OmegaConf API, and the analysis nodes read
# namespaced datasets such as "intensity.gradient_distances" by design (docs/data_flow.md).
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)
warnings.filterwarnings("ignore", message="One or more dataset names contain '.'", category=UserWarning)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Environments such as conf/paper override single keys, not whole top-level blocks.
    "merge_strategy": {"parameters": "soft", "catalog": "soft", "mlflow": "soft", "dask": "soft"},
    # conf/<env>/dask.yml: the cluster of the Dask runner.
    "config_patterns": {"dask": ["dask*", "dask*/**"]},
}
