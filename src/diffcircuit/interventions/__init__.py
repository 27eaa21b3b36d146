"""Interventions over images and timesteps: ablation sweeps, activation patching, attribution patching, sampling."""

from diffcircuit.interventions.ablation import Target, random_head_sets, targets
from diffcircuit.interventions.attribution import attribution_scores
from diffcircuit.interventions.patching import activation_patching
from diffcircuit.interventions.sampling import controlled_samples, sample_images, sampling_effect
from diffcircuit.interventions.sweep import ReferenceImages, ablation_sweep

__all__ = [
    "ReferenceImages",
    "Target",
    "ablation_sweep",
    "activation_patching",
    "attribution_scores",
    "controlled_samples",
    "random_head_sets",
    "sample_images",
    "sampling_effect",
    "targets",
]
