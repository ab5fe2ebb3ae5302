"""MAR models with random weights: the one builder behind `lazymar bench --random-init/--compute-bound`, the
benchmarks and the tests. It seeds torch itself, so that a model is the same whoever builds it first."""
from __future__ import annotations

from typing import Literal, Optional

import torch

from .config import MARConfig, SamplingSettings, get_config
from .model import MAR

Randomise = Literal["zero", "head", "all", "none"]


def random_mar(config: MARConfig, seed: int = 0, *, randomise: Randomise = "zero", std: float = 0.02,
               token_std: Optional[float] = None, sampling_defaults: Optional[SamplingSettings] = None) -> MAR:
    """A MAR in eval mode with the official init under torch seed ``seed``, then weights drawn again from N(0, std):

    - ``randomise="zero"``: the tensors the official init leaves all zero (adaLN-zero, biases), so that labels and
      every layer matter (the head's output depends on z, the token cache's similarity ranking is not degenerate);
    - ``"head"``: every tensor of the diffusion head's network (its adaLN-zero init makes it inert, and caching
      the head would be exact);
    - ``"all"``: every tensor (the official init leaves some at zero, which would hide mix-ups of weights);
    - ``"none"``: the official init as it is.

    ``token_std``, when given, then also draws ``mask_token`` and ``fake_latent`` from N(0, token_std), so that the
    masked positions and the unconditional branch differ from the start. ``sampling_defaults``: the model's
    (default: ``SamplingSettings()``).
    """
    torch.manual_seed(seed)
    model = MAR(config, sampling_defaults).eval()
    if randomise == "zero":
        drawn = [p for p in model.parameters() if bool((p == 0).all())]
    elif randomise == "head":
        drawn = list(model.diffloss.net.parameters())
    elif randomise == "all":
        drawn = list(model.parameters())
    elif randomise == "none":
        drawn = []
    else:
        raise ValueError(f"randomise must be zero, head, all or none, not {randomise!r}")
    with torch.no_grad():
        for p in drawn:
            p.normal_(0.0, std)
        if token_std is not None:
            for p in (model.mask_token, model.fake_latent):
                p.normal_(0.0, token_std)
    return model


RANDOM_MODEL_SAMPLING = SamplingSettings(num_iter=64, cfg=3.0)


def random_model(arch: str, seed: int = 0, device: str | torch.device = "cpu") -> MAR:
    """``random_mar`` of the architecture ``arch`` (see lazymar.config.CONFIGS) on ``device``, sampling 64 steps at
    cfg 3 by default: the model of ``lazymar bench --random-init`` and ``--compute-bound``."""
    return random_mar(get_config(arch), seed, sampling_defaults=RANDOM_MODEL_SAMPLING).to(device)
