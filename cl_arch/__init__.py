"""cl_arch: transformers whose fast-weight memories keep learning while they are used."""
from .version import __version__
from .kernels.commit import reward_commit
from .kernels.plastic import plastic_rule
from .config import PlasticConfig
from .memory import EpisodicConfig, FastLayerConfig, MemoryConfig, ReadoutConfig, RewardMemoryConfig
from .model import PlasticTransformer, default_model_dir, load_default
from .state import AttnLayerState, FastLayerState, ModelState
from .session import Session, SessionStore

__all__ = ["PlasticConfig", "FastLayerConfig", "MemoryConfig", "ReadoutConfig", "EpisodicConfig", "RewardMemoryConfig", "PlasticTransformer", "ModelState", "FastLayerState", "AttnLayerState",
           "Session", "SessionStore", "plastic_rule", "reward_commit", "load_default", "default_model_dir",
           "__version__"]
