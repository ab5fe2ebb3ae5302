"""What the measuring commands (``eval``, ``bench``, ``sweep``) share: the ImageNet options (--vae, --fid-stats,
--inception-weights) and running under torchrun (each rank samples its share of the batches, rank 0 reports)."""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import torch

from ..model import MAR
from ..errors import ArgumentError
from ..runs import ImageSpace


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
    """Tokens to images with the --vae decoder, and with --fid-stats the ImageNet quality evaluator made the VAE
    models' one (lazymar.imagenet); everything loaded and checked now, before any sampling. ``need_images``
    False (comparisons): a latent model without --vae has no image space, and only token MSE is compared."""
    from ..vae import check_vae_fits, load_vae
    vae = load_vae(args.vae, device=args.device) if getattr(args, "vae", None) else None
    if need_images or vae is not None:
        check_vae_fits(model, vae)
    from .. import imagenet
    quality = None
    if getattr(args, "fid_stats", None):
        if vae is None:
            raise ArgumentError("--fid-stats scores VAE-decoded ImageNet samples: pass the model's --vae too")
        from ..download import resolve
        quality = imagenet.ImageNetQuality.load(resolve(args.fid_stats, "fid-stats"), args.device,
                                                args.inception_weights)
    imagenet.use_imagenet_quality(quality)  # None: an earlier command's evaluator does not linger
    return ImageSpace(model, vae)


@contextlib.contextmanager
def launched(args: argparse.Namespace) -> Iterator[torch.device]:
    """Join torchrun's process group when launched by it (lazymar.distributed) and set ``args.device`` to this
    rank's device (``cuda`` -> ``cuda:LOCAL_RANK``)."""
    from .. import distributed
    with distributed.launched(args.device) as device:
        args.device = device
        yield device
