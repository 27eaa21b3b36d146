"""``RunConfig``: everything that determines a run's results, validated up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffcircuit.errors import DiffcircuitError

__all__ = ["RunConfig", "parse_timesteps"]


def parse_timesteps(text: str) -> tuple[int, ...]:
    """``"100,500,900"`` -> ``(100, 500, 900)``; a clear error for anything else."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DiffcircuitError(f"timesteps must be comma-separated integers like 100,500,900, not {text!r}") from None
    if not values:
        raise DiffcircuitError("give at least one timestep")
    return values


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The main job's settings. Defaults: the embedded model, synthetic vs LFW faces."""

    model: str = "embedded"
    allow_pickle: bool = False
    data_a: str = "synthetic"
    data_b: str = "faces"
    n: int = 100
    timesteps: tuple[int, ...] = (100, 500, 900)
    seed: int = 0
    batch_size: int = 50
    device: str = "cpu"
    skip_bad: bool = False
    capture: str = "fused"  # "fused" (one fused kernel call) or "naive" (explicit softmax, the reference)
    ablate_n: int = 16  # images per dataset for the ablation sweep (0: no ablations)
    ablation_methods: tuple[str, ...] = ("zero", "mean")
    seed_repeats: int = 2  # extra noise seeds (seed+1..) for the seed-variance check (0: none)
    null_sets: int = 10  # random head sets per component size, the null control for layer/block ablations

    def __post_init__(self):
        if self.n < 1:
            raise DiffcircuitError(f"--n must be at least 1, not {self.n}")
        if self.batch_size < 1:
            raise DiffcircuitError(f"--batch-size must be at least 1, not {self.batch_size}")
        if len(set(self.timesteps)) != len(self.timesteps):
            raise DiffcircuitError(f"timesteps repeat: {list(self.timesteps)}")
        if self.capture not in ("fused", "naive"):
            raise DiffcircuitError(f"--capture must be 'fused' or 'naive', not {self.capture!r}")
        if self.seed_repeats < 0:
            raise DiffcircuitError(f"--seed-repeats must be >= 0, not {self.seed_repeats}")
        if self.null_sets < 1:
            raise DiffcircuitError(f"--null-sets must be at least 1, not {self.null_sets}")
        if self.ablate_n < 0:
            raise DiffcircuitError(f"--ablate-n must be >= 0, not {self.ablate_n}")
        bad = [m for m in self.ablation_methods if m not in ("zero", "mean", "resample", "noise")]
        if bad or not self.ablation_methods:
            raise DiffcircuitError(f"ablation methods must be among zero, mean, resample, noise; got {list(self.ablation_methods)}")
        if self.seed < 0:
            raise DiffcircuitError(f"--seed must be >= 0, not {self.seed}")

    def check_timesteps(self, num_train_timesteps: int) -> None:
        bad = [t for t in self.timesteps if not 0 <= t < num_train_timesteps]
        if bad:
            raise DiffcircuitError(f"timesteps {bad} are outside the model's 0..{num_train_timesteps - 1}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        d["ablation_methods"] = list(self.ablation_methods)
        return d

    def results_key(self) -> dict:
        """The settings that change results (not batch size, device or capture path, which must not)."""
        d = self.to_dict()
        for k in ("batch_size", "device", "capture"):
            d.pop(k)
        return d
