"""What a schedule file or a recording was made for: the fields of a model configuration that decide whether it
applies (positions, blocks, widths, the head's size), and the one check that refuses it on another model.

A cache schedule is planned for a model's positions (its keep fractions were derived from that model's redundancy,
its selection layer and reused head blocks index that model's blocks); a recording measures one model. Both carry
a :class:`ModelFingerprint` (schedules under ``made_for``; recordings hold their whole configuration, from which
the fingerprint follows), and using them with a model of another fingerprint is refused in one line naming both.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional

from .config import CONFIGS, MARConfig
from .errors import LazymarError


class ModelMismatchError(LazymarError):
    """An input (schedule file, recording) made for another model than the one it is used with."""


@dataclass(frozen=True)
class ModelFingerprint:
    """The configuration fields an input depends on. ``model`` names the configuration (informative only: two
    fingerprints with the same fields match whatever their names)."""

    positions: int  # buffer + tokens: every per-position array and kept count is sized by it
    buffer_size: int
    encoder_depth: int
    decoder_depth: int
    encoder_width: int
    decoder_width: int
    head_depth: int
    head_width: int
    model: Optional[str] = field(default=None, compare=False)

    @classmethod
    def of(cls, config: MARConfig, model: Optional[str] = None) -> "ModelFingerprint":
        """The fingerprint of ``config``, named ``model`` (default: the named configuration it equals, if any)."""
        return cls(positions=config.buffer_size + config.seq_len, buffer_size=config.buffer_size,
                   encoder_depth=config.encoder_depth, decoder_depth=config.decoder_depth,
                   encoder_width=config.encoder_embed_dim, decoder_width=config.decoder_embed_dim,
                   head_depth=config.diffloss_d, head_width=config.diffloss_w,
                   model=model if model is not None else config_name(config))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any, error: Callable[[str], LazymarError] = LazymarError) -> "ModelFingerprint":
        """From a stored dict; ``error(message)`` is raised for anything else (the caller's error class)."""
        if not isinstance(data, dict):
            raise error(f"made_for must be an object of model fields or \"any\", got {data!r}"[:200])
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise error(f"made_for has an unknown field {unknown[0]!r}")
        missing = [n for n in names if n != "model" and n not in data]
        if missing:
            raise error(f"made_for lacks the field {missing[0]!r}")
        bad = [n for n in names if n != "model" and (isinstance(data[n], bool) or not isinstance(data[n], int)
                                                      or data[n] < 0)]
        if bad:
            raise error(f"made_for field {bad[0]!r} must be an integer >= 0, got {data[bad[0]]!r}")
        if not isinstance(data.get("model", ""), str):
            raise error(f"made_for field 'model' must be a name, got {data['model']!r}")
        return cls(**data)

    def describe(self) -> str:
        """e.g. "digits16 (320 positions, 4+4 blocks of width 96, head 3x128)"."""
        width = (f"width {self.encoder_width}" if self.encoder_width == self.decoder_width
                 else f"widths {self.encoder_width}+{self.decoder_width}")
        return (f"{self.model or 'a model'} ({self.positions} positions, {self.encoder_depth}+{self.decoder_depth} "
                f"blocks of {width}, head {self.head_depth}x{self.head_width})")


def config_name(config: MARConfig) -> Optional[str]:
    """The name of the named configuration whose fingerprint fields ``config`` shares, if any."""
    for name, named in CONFIGS.items():
        if _fields(named) == _fields(config):
            return name
    return None


def _fields(config: MARConfig) -> tuple:
    return (config.buffer_size, config.seq_len, config.encoder_depth, config.decoder_depth, config.encoder_embed_dim,
            config.decoder_embed_dim, config.diffloss_d, config.diffloss_w)


def check_made_for(what: str, made_for: Optional[ModelFingerprint], config: MARConfig,
                   model: Optional[str] = None) -> None:
    """Refuse ``what`` (a file named in the message) made for ``made_for`` on a model of ``config`` (named
    ``model``, e.g. "--model digits") when their fingerprints differ; None (made for any model) passes."""
    if made_for is None:
        return
    here = ModelFingerprint.of(config, model)
    if here != made_for:
        raise ModelMismatchError(f"{what} was made for {made_for.describe()} but {here.describe()} is used; "
                                 f"use it with the model it was made for")


def check_same_model(what: str, made_with: MARConfig, config: MARConfig, model: Optional[str] = None,
                     made_with_name: Optional[str] = None) -> None:
    """Refuse ``what`` (e.g. a recording), made with a model of configuration ``made_with`` (named
    ``made_with_name``), on a model of ``config`` (named ``model``) unless the configurations are equal: one line
    naming both, and the other fields that differ when the fingerprints agree."""
    if made_with == config:
        return
    made, here = ModelFingerprint.of(made_with, made_with_name), ModelFingerprint.of(config, model)
    other = "" if made != here else "; they differ in " + ", ".join(
        f"{f.name} ({getattr(made_with, f.name)!r} vs {getattr(config, f.name)!r})" for f in fields(MARConfig)
        if getattr(made_with, f.name) != getattr(config, f.name))
    raise ModelMismatchError(f"{what} was made for {made.describe()} but {here.describe()} is used{other}; "
                             f"use it with the model it was made for")
