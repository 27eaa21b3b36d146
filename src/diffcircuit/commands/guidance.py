"""``diffcircuit guidance``: both branches of classifier-free guidance analysed as two runs, compared head by head.

The conditional branch is the prompt; the unconditional one the empty prompt (a captioned folder's captions are
not used there). Both runs see the same images and noise, so each head's normalised entropy is compared paired
over images (``protocol.analyses.guidance_table``: the difference with its CI and a BH-corrected p).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from diffcircuit.errors import ConfigError, InputError
from diffcircuit.protocol.analyses import guidance_table
from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.store import write_parquet

__all__ = ["GuidanceResult", "run_guidance"]


@dataclass(frozen=True, kw_only=True)
class GuidanceResult:
    out_dir: Path
    table: (
        pd.DataFrame
    )  # per dataset x timestep x head: conditional − unconditional normalised entropy, CI, p, q


def run_guidance(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    progress: Callable[[str, str, int, int], None] | None = None,
) -> GuidanceResult:
    """Run ``cfg`` (its prompt: the conditional branch) and its unconditional twin into ``out_dir/conditional`` and
    ``out_dir/unconditional``; write ``out_dir/guidance.parquet``. ``progress(branch, stage, done, total)``."""
    from diffcircuit.protocol.runner import run_protocol
    from diffcircuit.report import finalize_run

    out = Path(out_dir)
    if not cfg.prompt:
        raise ConfigError(
            "prompt must not be empty: the empty prompt is the unconditional branch", "prompt"
        )
    if out.exists():
        raise InputError(f"{out} exists; the comparison goes into a new directory")
    branches = {
        "conditional": dataclasses.replace(cfg, prompt_embeds=None),
        "unconditional": dataclasses.replace(cfg, prompt=None, prompt_embeds=None, captions=False),
    }
    for name, branch in branches.items():
        report = (
            None
            if progress is None
            else (lambda stage, done, total, name=name: progress(name, stage, done, total))
        )
        run_protocol(
            branch, out / name, progress=report, finish=finalize_run
        )  # each branch a whole run
    heads = {
        name: pd.read_parquet(out / name / "tables" / "head_metrics.parquet") for name in branches
    }
    table = guidance_table(
        heads["conditional"], heads["unconditional"], seed=cfg.seed, correction=cfg.correction
    )
    write_parquet(out / "guidance.parquet", table)
    return GuidanceResult(out_dir=out, table=table)
