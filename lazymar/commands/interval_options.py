"""The options of confidence intervals and verdicts (lazymar.runs.intervals.IntervalOptions), declared before a run
as a non-inferiority test needs: --bootstrap, --bootstrap-seed, --baseline and --margin-*."""
from __future__ import annotations

import argparse
from typing import Optional

from .. import stats
from ..validation import positive_int


def add_interval_args(parser: argparse.ArgumentParser, baseline: Optional[str] = "lazymar",
                      margins: bool = True) -> None:
    """--bootstrap, --bootstrap-seed and (with ``margins``) --margin-psnr/-accuracy/-fid, and --baseline when
    ``baseline`` names its default."""
    group = parser.add_argument_group("confidence intervals and verdicts (lazymar.stats)")
    group.add_argument("--bootstrap", type=positive_int, default=stats.DEFAULT_RESAMPLES, metavar="N",
                       help=f"bootstrap resamples of the 95 %% intervals (default {stats.DEFAULT_RESAMPLES})")
    group.add_argument("--bootstrap-seed", type=int, default=stats.DEFAULT_SEED,
                       help="seed of the bootstrap (default 0)")
    if baseline is not None:
        group.add_argument("--baseline", default=baseline, metavar="NAME|PATH.json",
                           help=f"row the paired differences d_<metric> and verdicts are against (default "
                                f"{baseline}; 'none': the uncached reference; a schedule not in the run is added)")
    if margins:
        group.add_argument("--margin-psnr", type=float, default=0.5, help="PSNR loss allowed, dB (default 0.5)")
        group.add_argument("--margin-accuracy", type=float, default=0.5,
                           help="accuracy loss allowed, points (default 0.5)")
        group.add_argument("--margin-fid", type=float, default=5.0,
                           help="FID increase allowed, percent of the baseline's FID (default 5)")
