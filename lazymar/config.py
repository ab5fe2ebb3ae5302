"""Model configurations (the official MAR sizes, the tiny fixture size, the embedded digits model) and the sampling
settings a model carries as its defaults."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import SettingsError


@dataclass(frozen=True)
class MARConfig:
    """Constructor settings of a MAR model, named as in the official ``args``."""

    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    diffloss_d: int = 3
    diffloss_w: int = 1024
    class_num: int = 1000
    num_sampling_steps: str = "100"
    label_drop_prob: float = 0.1
    diffusion_batch_mul: int = 4
    # Not an official setting: clamp the head's predicted x0 to [-1, 1] while sampling. Right for pixel-space
    # tokens with a known range (the digits model); the official latent-space models sample without it.
    clip_denoised: bool = False

    @property
    def grid_size(self) -> int:
        """Tokens per side of the square token grid."""
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid_size**2

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, args: dict[str, Any] | Any) -> "MARConfig":
        """Build from a dict or an argparse Namespace; unknown keys (lr, epochs, ...) are ignored."""
        if not isinstance(args, dict):
            args = vars(args)
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in args.items() if k in names}
        if "num_sampling_steps" in kwargs:
            kwargs["num_sampling_steps"] = str(kwargs["num_sampling_steps"])
        return cls(**kwargs)


@dataclass(frozen=True)
class SamplingSettings:
    """The knobs of MAR sampling; checkpoints store their defaults (``MAR.sampling_defaults``)."""

    num_iter: int = 64
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    order: str = "mar"  # generation order (lazymar.orders): "mar", or GtR's two-stage "gtr:<detail steps>"
    # the head's steps per token (lazymar.head_steps): "uniform", or GtR's FTS "fts:<fraction>:<reduced steps>";
    # held parsed (a HeadSteps, the spec text with its allocation) whatever text it was given as
    head_steps: str = "uniform"
    # numerical precision (lazymar.precision): "fp32", or autocast of the transformer, head and VAE decode to
    # "bf16" / "fp16"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.num_iter < 1:
            raise SettingsError(f"num_iter must be >= 1, got {self.num_iter}")
        if self.cfg_schedule not in ("linear", "constant"):
            raise SettingsError(f"cfg_schedule must be 'linear' or 'constant', got {self.cfg_schedule!r}")
        if not math.isfinite(self.cfg):
            raise SettingsError(f"cfg must be a finite number, got {self.cfg}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SettingsError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.order != "mar":
            from .orders import generation_order
            generation_order(self.order)  # raises SettingsError on a bad spec
        from .head_steps import HeadSteps
        object.__setattr__(self, "head_steps", HeadSteps(self.head_steps))  # SettingsError on a bad spec
        if self.precision != "fp32":
            from .precision import check_precision
            check_precision(self.precision)

    def check_for(self, seq_len: int, head_steps: int) -> None:
        """The checks against a model of ``seq_len`` tokens whose diffusion head runs ``head_steps`` steps."""
        check_num_iter(self.num_iter, seq_len)
        self.head_steps.check_for(head_steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the head steps as their spec text), for JSON, checkpoints and recordings."""
        return {**asdict(self), "head_steps": str(self.head_steps)}


def check_num_iter(num_iter: int, seq_len: int) -> None:
    """Each MAR step decodes at least one token: num_iter <= seq_len. The one check of the step count against a
    model (``SamplingSettings`` itself holds num_iter >= 1)."""
    if num_iter > seq_len:
        raise SettingsError(f"num_iter {num_iter} exceeds the model's {seq_len} tokens: the sampling steps "
                            f"(--num-iter) must lie in [1, {seq_len}], as each step decodes at least one token")


def _official(width: int, depth: int, heads: int, head_depth: int, head_width: int) -> MARConfig:
    return MARConfig(
        encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
        decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
        diffloss_d=head_depth, diffloss_w=head_width,
    )


# the embedded model: 8x8 digits, one pixel value per token, MAR's buffer of 64
_DIGITS = MARConfig(
    img_size=8, vae_stride=1, patch_size=1, vae_embed_dim=1,
    encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=4,
    decoder_embed_dim=96, decoder_depth=4, decoder_num_heads=4,
    buffer_size=64, diffloss_d=3, diffloss_w=128, class_num=10, num_sampling_steps="100",
    clip_denoised=True,
)

CONFIGS: dict[str, MARConfig] = {
    "mar_base": _official(768, 12, 12, 6, 1024),
    "mar_large": _official(1024, 16, 16, 8, 1280),
    "mar_huge": _official(1280, 20, 16, 12, 1536),
    # the size of the official-layout fixture mar_tiny_a.pth in $LAZYMAR_REFERENCE_DIR (tests/test_loading.py)
    "mar_tiny": MARConfig(
        img_size=128, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, buffer_size=16,
        diffloss_d=2, diffloss_w=96, class_num=10, num_sampling_steps="10",
    ),
    "digits": _DIGITS,
    # the same network on the digits laid out like MAR-B/L/H: 8x8 images upsampled to 32x32 (lazymar.digits), 2x2
    # pixel patches as tokens -> a 16x16 grid of 4-channel tokens, plus the official 64-position buffer: 320 positions
    "digits16": replace(_DIGITS, img_size=32, patch_size=2),
}


# Published evaluation settings of the released models (``--preset``): what each paper sampled its FID-50k with.
# Both evaluations run the diffusion head for 100 steps (``--num_sampling_steps 100``, the checkpoints' own).
PRESET_HEAD_STEPS = 100
SAMPLING_PRESETS: dict[str, dict[str, SamplingSettings]] = {
    # MAR's README evaluation commands (its paper's FID 2.31 / 1.78 / 1.55): 256 steps, linear CFG, temperature 1.0
    "mar-paper": {arch: SamplingSettings(num_iter=256, cfg=cfg, cfg_schedule="linear", temperature=1.0)
                  for arch, cfg in (("mar_base", 2.9), ("mar_large", 3.0), ("mar_huge", 3.2))},
    # LazyMAR's README evaluation commands pass --num_iter 64 and keep its eval.py's other defaults: cfg 3.25, linear,
    # temperature 1.0 (its table's FIDs at 64 steps). The release gives no other CFG for MAR-B or MAR-L.
    "lazymar-paper": {arch: SamplingSettings(num_iter=64, cfg=3.25, cfg_schedule="linear", temperature=1.0)
                      for arch in ("mar_base", "mar_large", "mar_huge")},
}


def sampling_preset(preset: str, arch: str | None) -> SamplingSettings:
    """The published settings of ``preset`` for the official model ``arch``; SettingsError for another model."""
    if preset not in SAMPLING_PRESETS:
        raise SettingsError(f"unknown sampling preset {preset!r}; known: {', '.join(SAMPLING_PRESETS)}")
    published = SAMPLING_PRESETS[preset]
    if arch not in published:
        raise SettingsError(f"the {preset} preset holds the published settings of {', '.join(published)} only, and "
                            f"this model is {arch or 'none of them'}: set --num-iter, --cfg, ... instead")
    return published[arch]


def get_config(name: str, **overrides: Any) -> MARConfig:
    """A named configuration, optionally with some fields replaced."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; known: {', '.join(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)
