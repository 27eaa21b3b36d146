"""Typed results of a run: ``RunResult`` (what ``dc.run`` returns), ``Summary`` (summary.json), ``Claim`` (one
headline claim with its test) and ``CircuitRecord`` (one circuit file; built in ``protocol.circuits``). Dicts appear
only at the JSON edge: ``from_dict`` / ``to_dict``.

Tables are read lazily, on first access (``result.table("ablations")``, ``result.head_metrics``): a run at the
paper's scale has millions of head rows, and most callers want one table.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from diffcircuit.errors import InputError
from diffcircuit.protocol.circuits import CircuitRecord

__all__ = ["CircuitRecord", "Claim", "RunResult", "Summary"]


@dataclass(frozen=True, kw_only=True)
class Claim:
    """One claim of the validity section: a label and the hypothesis test behind it (``report.validity``)."""

    claim: str
    kind: str  # roles, divergence, critical, circuit, complexity, patching, attribution
    status: str  # supported, not supported, withheld, descriptive
    test: str | None = None
    n: int | dict | None = None
    correction: str | None = None
    effect_size: str | dict | None = None
    threats: tuple[str, ...] = ()
    headline: bool = True
    dataset: str | None = None
    timestep: int | None = None
    result: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Claim:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {
            k: (tuple(v) if k == "threats" else v) for k, v in d.items() if k in known
        }
        return cls(**values)

    @property
    def supported(self) -> bool:
        return self.status == "supported"


@dataclass(frozen=True, kw_only=True)
class Summary:
    """summary.json: the headline of a run, every mean with its interval, every claim with its test. Built by
    ``report.summary.build_summary`` and read by the report and the CLI as it is; ``to_dict`` is the JSON. Top-level
    fields are typed, in the JSON's order; their contents are the JSON's (lists and dicts of numbers and strings)."""

    model: dict
    seed: int
    datasets: dict
    dataset_differences: dict | list | None = (
        None  # per image property: b − a, Cohen's d with CI, p, BH q
    )
    mean_reference: str | None = None  # mean ablation's reference images
    timesteps: list[int]
    denoising: list[dict]
    uninformative: list[dict] = field(default_factory=list)
    entropy: list[dict]
    entropy_by_layer: list[dict] = field(default_factory=list)
    roles: list[dict] = field(default_factory=list)
    role_evidence: list[dict] | None = None
    role_differences: list[dict] | dict | None = None
    entropy_divergence: list[dict] = field(default_factory=list)
    entropy_difference_heads: list[dict] | None = None
    ablation: dict | None = None
    patching: dict | None = None
    attribution: list[dict] | None = None
    complexity_ratio: dict | None = None
    complexity_measures: list[dict] | None = None
    tests: dict | list | None = None
    seed_variance: list[dict] | None = None
    circuits: dict | None = None
    pending: list[str] = field(default_factory=list)
    paper_comparison: dict | None = None
    validity: dict | None = None
    extra: dict = field(
        default_factory=dict
    )  # keys a newer summary.json has that this version does not name

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in d.items() if k in known},
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict:
        """The JSON object, in summary.json's key order."""
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return out | self.extra

    @property
    def informative(self) -> frozenset[tuple[str, int]]:
        """The (dataset, timestep) pairs at which the model beats the trivial predictor (``denoising[...]
        ["informative"]``, True where untested); headline claims leave the others out."""
        return frozenset(
            (d["dataset"], int(d["timestep"])) for d in self.denoising if d.get("informative", True)
        )

    @property
    def claims(self) -> list[Claim]:
        """Every claim of the validity section, supported or not."""
        return [Claim.from_dict(c) for c in (self.validity or {}).get("claims", [])]

    @property
    def supported(self) -> list[Claim]:
        """The headline claims whose test rejects its null."""
        return [c for c in self.claims if c.supported and c.headline]


@dataclass(frozen=True, kw_only=True, eq=False)
class RunResult:
    """A finished run directory: its summary, its manifest and, read on first access, its tables."""

    out_dir: Path
    summary: Summary
    manifest: dict

    @classmethod
    def read(cls, out_dir: str | Path) -> RunResult:
        """The result of a finished run directory (``summary.json`` and ``manifest.json``)."""
        out_dir = Path(out_dir)
        try:
            summary = json.loads((out_dir / "summary.json").read_text())
            manifest = json.loads((out_dir / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{out_dir} is not a finished diffcircuit run: {str(exc).splitlines()[0]}"
            ) from None
        return cls(out_dir=out_dir, summary=Summary.from_dict(summary), manifest=manifest)

    @property
    def report(self) -> Path:
        return self.out_dir / "report.html"

    @property
    def summary_path(self) -> Path:
        return self.out_dir / "summary.json"

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / "manifest.json"

    @property
    def figures(self) -> dict[str, Path]:
        """The report's figures by name (``figures/<name>.png``)."""
        return {p.stem: p for p in sorted((self.out_dir / "figures").glob("*.png"))}

    @property
    def circuit_files(self) -> list[Path]:
        """``circuits/<dataset>_t<window>.json``, one per dataset x window (read as ``circuits``)."""
        return sorted((self.out_dir / "circuits").glob("*.json"))

    @property
    def tables(self) -> list[str]:
        """The names of the run's tables (``tables/<name>.parquet``)."""
        return sorted(p.stem for p in (self.out_dir / "tables").glob("*.parquet"))

    @cached_property
    def _read(self) -> dict[str, pd.DataFrame]:
        return {}

    def table(self, name: str) -> pd.DataFrame:
        """Table ``name`` (e.g. ``"ablations"``), read from disk the first time it is asked for."""
        cache = self._read
        if name not in cache:
            path = self.out_dir / "tables" / f"{name}.parquet"
            if not path.exists():
                raise InputError(
                    f"this run has no table {name!r}; it has: {', '.join(self.tables)}"
                )
            cache[name] = pd.read_parquet(path)
        return cache[name]

    @cached_property
    def head_metrics(self) -> pd.DataFrame:
        return self.table("head_metrics")

    @cached_property
    def denoising(self) -> pd.DataFrame:
        return self.table("denoising")

    @cached_property
    def circuits(self) -> list[CircuitRecord]:
        """The circuit records (``circuits/*.json``), one per dataset x window."""
        return [CircuitRecord.from_dict(json.loads(p.read_text())) for p in self.circuit_files]
