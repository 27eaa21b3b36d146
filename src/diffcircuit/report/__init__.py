"""Summary, figures and the HTML report, all rebuilt from a run directory's files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from diffcircuit.errors import InputError
from diffcircuit.protocol.store import write_json
from diffcircuit.report.html import write_report
from diffcircuit.report.result import CircuitRecord, Claim, RunResult, Summary
from diffcircuit.report.summary import build_summary

__all__ = [
    "CircuitRecord",
    "Claim",
    "RunResult",
    "Summary",
    "build_summary",
    "finalize_run",
    "write_report",
]


def finalize_run(run_dir: str | Path) -> RunResult:
    """Compute ``summary.json`` and write ``report.html`` from a run directory's manifest and tables."""
    run_dir = Path(run_dir)
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        heads = pd.read_parquet(run_dir / "tables" / "head_metrics.parquet")
        images = pd.read_parquet(run_dir / "tables" / "denoising.parquet")
        roles = pd.read_parquet(run_dir / "tables" / "head_roles.parquet")
        divergence = pd.read_parquet(run_dir / "tables" / "divergence.parquet")
        optional = {
            name: pd.read_parquet(run_dir / "tables" / f"{name}.parquet")
            for name in (
                "ablations",
                "patching",
                "attribution",
                "complexity",
                "tests",
                "critical",
                "seed_variance",
                "circuit_curves",
                "gallery",
                "divergence_heads",
                "gallery_images",
                "token_heatmaps",
                "datasets",
            )
            if (run_dir / "tables" / f"{name}.parquet").exists()
        }
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{run_dir} is not a complete diffcircuit run: {str(exc).splitlines()[0]}"
        ) from None
    circuits = [
        CircuitRecord.from_dict(json.loads(p.read_text()))
        for p in sorted((run_dir / "circuits").glob("*.json"))
    ]
    summary = build_summary(
        manifest=manifest,
        heads=heads,
        images=images,
        roles=roles,
        divergence=divergence,
        ablations=optional.get("ablations"),
        patching=optional.get("patching"),
        attribution=optional.get("attribution"),
        complexity=optional.get("complexity"),
        tests=optional.get("tests"),
        critical=optional.get("critical"),
        seed_variance=optional.get("seed_variance"),
        circuits=circuits,
        datasets=optional.get("datasets"),
        divergence_heads=optional.get("divergence_heads"),
    )
    write_json(run_dir / "summary.json", summary.to_dict())  # the JSON edge
    write_report(
        run_dir,
        summary,
        heads,
        roles,
        optional.get("ablations"),
        circuits=circuits,
        curves=optional.get("circuit_curves"),
        gallery=(optional["gallery"], optional["gallery_images"])
        if "gallery" in optional
        else None,
        tests=optional.get("tests"),
        token_heatmaps=optional.get("token_heatmaps"),
        cost=manifest.get("cost"),
        config=manifest.get("config"),
        attribution=optional.get("attribution"),
        patching=optional.get("patching"),
    )
    return RunResult(out_dir=run_dir, summary=summary, manifest=manifest)
