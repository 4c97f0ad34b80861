"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from best_minibatch.hooks import RunChecks

# Every parameter and input of a run is checked before its first node (docs/reliability.md).
HOOKS = (RunChecks(),)

# kedro-viz writes a .viz/ folder on every run through its hooks; runs don't need it.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro-viz",)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Environments such as conf/paper override single keys, not whole top-level blocks.
    "merge_strategy": {"parameters": "soft", "catalog": "soft"},
}
