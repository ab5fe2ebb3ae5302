"""The ImageNet options of the commands that score images (``eval``, ``bench``, ``sweep``):
--vae, --fid-stats and --inception-weights, turned into the image space and quality evaluator of a run."""
from __future__ import annotations

import argparse
from typing import Optional

from ..errors import ArgumentError
from ..model import MAR
from ..runs import ImageSpace, QualityEvaluator, quality_evaluator


def add_imagenet_args(parser: argparse.ArgumentParser, vae: bool = True) -> None:
    """--vae (unless the command has it already), --fid-stats and --inception-weights."""
    if vae:
        parser.add_argument("--vae", default=None, metavar="kl16|PATH",
                            help="KL-16 VAE for latent-space models (official MAR): 'kl16' (`lazymar download kl16`) "
                                 "or a checkpoint path")
    parser.add_argument("--fid-stats", default=None, metavar="fid-stats|PATH",
                        help="FID reference statistics (.npz with mu/sigma; 'fid-stats': the ADM in256 stats of "
                             "MAR's evaluation, `lazymar download fid-stats`): FID and IS of the VAE-decoded samples "
                             "(needs torch-fidelity)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="local Inception weights file for --fid-stats (default: torch-fidelity's download)")


def image_space_from_args(model: MAR, args: argparse.Namespace, need_images: bool = True) -> ImageSpace:
    """Tokens to images with the --vae decoder, loaded and checked now, before any sampling. ``need_images`` False
    (comparisons): a latent model without --vae has no image space, and only token MSE is compared."""
    from ..vae import check_vae_fits, load_vae
    vae = load_vae(args.vae, device=args.device) if getattr(args, "vae", None) else None
    if need_images or vae is not None:
        check_vae_fits(model, vae)
    if getattr(args, "fid_stats", None) and vae is None:
        raise ArgumentError("--fid-stats scores VAE-decoded ImageNet samples: pass the model's --vae too")
    return ImageSpace(model, vae)


def quality_from_args(model: MAR, args: argparse.Namespace) -> Optional[QualityEvaluator]:
    """The quality evaluator of the command's runs, chosen here and passed to them: with --fid-stats ImageNet FID and
    IS of the VAE-decoded images (lazymar.imagenet, loaded now, before any sampling), else the model's own
    (lazymar.runs.quality_evaluator: the digits classifier's, or None)."""
    if getattr(args, "fid_stats", None):
        from ..download import resolve
        from ..imagenet import ImageNetQuality
        return ImageNetQuality.load(resolve(args.fid_stats, "fid-stats"), args.device, args.inception_weights)
    return quality_evaluator(model)
