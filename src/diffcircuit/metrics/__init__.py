"""Per-head measurements: attention statistics, probes, roles, observation of an image set, attention maps."""

from diffcircuit.metrics.gallery import attention_maps, token_maps
from diffcircuit.metrics.observe import Observation, observe, observe_with_null

__all__ = ["Observation", "attention_maps", "observe", "observe_with_null", "token_maps"]
