"""The Gymnasium environment: NeuronPruningEnv and its config."""

from onp_env.env.config import EnvConfig
from onp_env.env.core import GLOBALS, NeuronPruningEnv, PruningTarget

ENV_ID = "onp_env/NeuronPruning-v0"

__all__ = ["ENV_ID", "GLOBALS", "EnvConfig", "NeuronPruningEnv", "PruningTarget"]
