"""The commands besides ``run`` (whose pipeline is ``protocol``): each a config dataclass and a function that does
the work, which the CLI calls after parsing its flags."""

from diffcircuit.commands.ablate import AblateConfig, run_ablations
from diffcircuit.commands.cache import CacheConfig, run_cache
from diffcircuit.commands.calibrate import CalibrateConfig, calibrate
from diffcircuit.commands.discover import DiscoverConfig, run_discovery
from diffcircuit.commands.generate import GenerateConfig, run_generate
from diffcircuit.commands.guidance import run_guidance

__all__ = [
    "AblateConfig",
    "CacheConfig",
    "CalibrateConfig",
    "DiscoverConfig",
    "GenerateConfig",
    "calibrate",
    "run_ablations",
    "run_cache",
    "run_discovery",
    "run_generate",
    "run_guidance",
]
