"""onp-env: learned and heuristic neuron pruning against backdoors.

The environment `onp_env/NeuronPruning-v0` and the task suites' ids (`onp_env/Digits-v0`,
`onp_env/FashionMNIST-v0`: onp_env.suite) are registered with Gymnasium on import.
The lab: datasets (`onp_env.data`), models (`onp_env.models`), attacks (`onp_env.attacks`),
backdoored-model artifacts (`onp_env.zoo`, `onp_env.artifacts`) and metrics (`onp_env.metrics`).
"""

__version__ = "0.1.0"

from onp_env.artifacts import Artifact, load_artifact  # noqa: E402
from onp_env.config import LabConfig, load_config  # noqa: E402
from onp_env.errors import OnpError  # noqa: E402
from onp_env.zoo import build_artifact  # noqa: E402


def _register() -> None:
    import gymnasium

    # No max_episode_steps (TimeLimit): the limit depends on the model's unit count, known only once
    # its artifact is loaded, and on the budget and zoo passed to make(); one fixed number would cut
    # short the episodes of larger models. The env truncates itself instead (NeuronPruningEnv.step_limit).
    if "onp_env/NeuronPruning-v0" not in gymnasium.registry:
        gymnasium.register(id="onp_env/NeuronPruning-v0", entry_point="onp_env.env.core:NeuronPruningEnv")
    from onp_env.suite.spec import register  # the task suites' ids (onp_env/suite/spec.py)

    register()


_register()

__all__ = ["Artifact", "LabConfig", "OnpError", "__version__", "build_artifact", "load_artifact", "load_config"]
