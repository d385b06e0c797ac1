"""onp-env: learned and heuristic neuron pruning against backdoors.

The lab: datasets (`onp_env.data`), models (`onp_env.models`), attacks (`onp_env.attacks`),
backdoored-model artifacts (`onp_env.zoo`, `onp_env.artifacts`) and metrics (`onp_env.metrics`).
"""

__version__ = "0.1.0"

from onp_env.artifacts import Artifact, load_artifact  # noqa: E402
from onp_env.config import LabConfig, load_config  # noqa: E402
from onp_env.errors import OnpError  # noqa: E402
from onp_env.zoo import build_artifact  # noqa: E402

__all__ = ["Artifact", "LabConfig", "OnpError", "__version__", "build_artifact", "load_artifact", "load_config"]
