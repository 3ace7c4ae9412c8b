"""The planner tests' config file (tests/configs.py's tiny config, one dataset) for `--config=`."""

from tests.configs import tiny_train_config


def get_config(arg=None):
    c = tiny_train_config()
    c.data.datasets = {"ltip": c.data.datasets.ltip}
    return c
