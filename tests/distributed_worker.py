"""Run by tests/test_distributed.py, under torchrun (2 ranks, gloo) or as one plain process.

    python tests/distributed_worker.py OUT.pt

Gathers rank-dependent tensors of different lengths, and generates a SamplePlan's batches on each rank with a tiny
random MAR, scoring them with the stand-in extractor; rank 0 saves everything to OUT.pt.
"""
from __future__ import annotations

import sys

import torch

from lazymar import distributed
from lazymar.imagenet import InceptionStats, ReferenceStats
from lazymar.model import MAR
from lazymar.runs import SamplePlan
from lazymar.sampling import SamplingSettings, generate
from builders import tiny_mar
from standins import StandInExtractor, pseudo_images

PLAN = SamplePlan.balanced(num_samples=7, num_classes=10, seed=3, batch_size=2)  # 4 batches, the last of 1
SETTINGS = SamplingSettings(num_iter=4, cfg=2.0)


def plan_model() -> MAR:
    """The tiny random MAR (8x8 tokens of 16 channels, 5 head steps) that every rank samples with."""
    return tiny_mar(num_sampling_steps="5")


def gathers() -> dict:
    r = distributed.rank()
    mine = torch.arange(r + 2, dtype=torch.float64) + 10 * r  # rank r: r + 2 rows
    return {"rank": r, "world_size": distributed.world_size(),
            "tensors_to_0": distributed.gather_tensors(mine),
            "tensors_to_all": distributed.gather_tensors(mine.reshape(-1, 1).repeat(1, 3), dst=None),
            "objects_to_0": distributed.gather_objects({"rank": r, "rows": len(mine)}),
            "objects_to_all": distributed.gather_objects(r, dst=None)}


def plan_run() -> dict:
    model, extractor, stats = plan_model(), StandInExtractor(), InceptionStats()
    tokens, index = [], []
    for batch in PLAN.batches(distributed.rank(), distributed.world_size()):
        t = generate(model, batch.labels, SETTINGS, seed=torch.Generator().manual_seed(batch.seed))
        stats.add_images(extractor, pseudo_images(model, t), start=batch.start)
        tokens.append(t)
        index.extend(range(batch.start, batch.stop))
    all_tokens = distributed.gather_samples(torch.cat(tokens), index)
    parts = distributed.gather_objects(stats)
    if not distributed.is_main():
        return {}
    merged = InceptionStats.merged(parts)
    mu, sigma = merged.feature_statistics()
    reference = ReferenceStats(mu * 0.5, sigma * 2.0, "test")
    return {"plan_tokens": all_tokens, "mu": mu, "sigma": sigma, "fid": merged.fid(reference),
            "inception_score": merged.inception_score(splits=2)}


def runs_core() -> dict:
    """The runs core scoring on every rank: the digits model's reference and lazymar run (accuracy, digits-FID,
    PSNR, token MSE and their per-sample values), and a tiny latent MAR with a tiny VAE scored by ImageNetQuality
    with the stand-in extractor (FID, IS, per-sample features); every rank returns the same numbers."""
    import numpy as np
    from lazymar.cache.schedule_file import load_schedule
    from lazymar.checkpoint import load_model
    from lazymar.imagenet import ImageNetQuality
    from lazymar.runs import Reference, sample_squared_errors
    from builders import tiny_vae
    from lazymar.runs.intervals import sample_arrays
    out = {}
    digits, settings = load_model("digits"), SamplingSettings(num_iter=4, cfg=3.0)
    reference = Reference(digits, SamplePlan.balanced(10, 10, seed=5, batch_size=3), settings)
    run, row = reference.measure(load_schedule("lazymar", 4, digits.config))
    base = reference.row()
    out["digits"] = {"row": {k: row[k] for k in ("psnr", "token_mse", "accuracy", "fid", "flops_ratio")},
                     "base": {k: base[k] for k in ("accuracy", "fid", "psnr", "token_mse")},
                     "errors": sample_squared_errors(run, reference.run),
                     "per_sample": sample_arrays(run, None, reference.evaluator)}
    latent, vae = plan_model(), tiny_vae(z_channels=16, ch_mult=(1, 2))
    stats = ReferenceStats(np.random.default_rng(0).normal(size=64) * 0.1, np.eye(64) * 0.05, "test")
    reference = Reference(latent, PLAN, SETTINGS, vae=vae, evaluator=ImageNetQuality(StandInExtractor(), stats))
    run, row = reference.measure(load_schedule("lazymar", SETTINGS.num_iter, latent.config))
    out["imagenet"] = {"row": {k: row[k] for k in ("psnr", "token_mse", "fid", "inception_score")},
                       "base": reference.quality(),
                       "features": run.quality_stream.stats.ordered_features()}
    everyone = distributed.gather_objects(repr(out["digits"]["row"]) + repr(out["imagenet"]["row"]), dst=None)
    out["ranks_agree"] = len(set(everyone)) == 1
    return out


def main(out: str) -> None:
    with distributed.launched("cpu"):
        result = {**gathers(), **plan_run(), **runs_core()}
        if distributed.is_main():
            torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1])
