"""Loading models: the embedded digits MAR by name, or an official MAR checkpoint by path.

An official checkpoint is a dict ``{"model", "model_ema", "args"?}`` (or a bare state dict). The architecture comes
from ``args``, from a name the user gives (``arch``), or from the tensor shapes. Whatever goes wrong is reported as
one :class:`CheckpointError` line naming the cause, never as a traceback from inside torch.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .config import CONFIGS, MARConfig
from .download import resolve as resolve_download
from .model import MAR
from .sampling import SamplingSettings
from .compat import safe_globals
from .errors import LazymarError
from .guards import first_non_finite

DATA_DIR = Path(os.environ.get("LAZYMAR_DATA", Path(__file__).resolve().parents[1] / "data"))
EMBEDDED = {name: DATA_DIR / "checkpoints" / f"{name}.pth" for name in ("digits", "digits16")}

# Sampling defaults of the released models (MAR README: linear CFG, temperature 1.0), at LazyMAR's 64 steps.
OFFICIAL_SAMPLING = {
    "mar_base": SamplingSettings(num_iter=64, cfg=2.9, cfg_schedule="linear", temperature=1.0),
    "mar_large": SamplingSettings(num_iter=64, cfg=3.0, cfg_schedule="linear", temperature=1.0),
    "mar_huge": SamplingSettings(num_iter=64, cfg=3.2, cfg_schedule="linear", temperature=1.0),
}
HEAD_DIM = 64  # assumed when the number of attention heads cannot be known (it leaves no trace in the shapes)
SHOWN = 5  # how many offending keys an error lists


class CheckpointError(LazymarError):
    """A checkpoint that cannot be loaded; the message names the cause in one line."""


# --- reading and checking state dicts (shared with lazymar.vae) ----------------------------------------------
def read_checkpoint(path: Path) -> dict[str, Any]:
    """The dict stored at ``path``; CheckpointError if the file is missing or holds no dict.

    Plain tensors and containers load safely (``weights_only``, plus argparse.Namespace for the official ``args``);
    a file that needs more unpickling is loaded fully, as the official code does, so pass only files you trust.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a checkpoint file: {path} is a directory")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"not a checkpoint: {path} is empty")
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch's zip archive or a pickle
        raise CheckpointError(f"not a checkpoint: {path} is neither a torch archive nor a pickle (it begins {head!r})")
    mmap = head.startswith(b"PK\x03\x04")  # a zip archive's tensors stay in the file until used (legacy: read)
    allowed = safe_globals([argparse.Namespace])  # before the try: an old torch is not "not a checkpoint"
    try:
        with allowed, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"not a checkpoint: torch.load cannot read {path} ({_first_line(err)})") from None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as err2:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
            raise CheckpointError(f"not a checkpoint: torch.load cannot read {path} ({_first_line(err2)})") from None
    except Exception as err:  # noqa: BLE001 - zip/EOF/OS errors all mean "not a checkpoint"
        raise CheckpointError(f"not a checkpoint: torch.load cannot read {path} ({_first_line(err)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"not a checkpoint: {path} holds a {type(ckpt).__name__}, not a dict of tensors")
    return ckpt


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def select_state_dict(ckpt: Mapping[str, Any], path: Path) -> tuple[dict[str, Tensor], str]:
    """The weights to use and where they came from: ``model_ema``, else ``model``, else the dict itself."""
    for key in ("model_ema", "model"):
        if key in ckpt:
            if not _is_state_dict(ckpt[key]):
                raise CheckpointError(f"not a checkpoint: {path}[{key!r}] is not a dict of tensors")
            return dict(ckpt[key]), key
    if _is_state_dict(ckpt):
        return dict(ckpt), "state dict"
    keys = ", ".join(map(repr, list(ckpt)[:SHOWN]))
    raise CheckpointError(f"not a checkpoint: {path} has neither 'model_ema' nor 'model' nor only tensors "
                          f"(keys: {keys or 'none'})")


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], path: Path,
                     what: str = "") -> None:
    """CheckpointError naming the first missing/unexpected keys or the first shape mismatch, if any."""
    where = f"{path}{' (' + what + ')' if what else ''}"
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = ([f"missing keys {_listed(missing)}"] if missing else []) + \
                ([f"unexpected keys {_listed(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{where} does not fit the architecture: {'; '.join(parts)}")
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(found[k].shape)]
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more mismatched tensors)" if len(wrong) > 1 else ""
        raise CheckpointError(f"{where}: shape mismatch for {k}: expected {tuple(expected[k].shape)}, "
                              f"found {tuple(found[k].shape)}{more}")


# --- architecture ------------------------------------------------------------------------------------------
SHAPE_FIELDS = ("encoder_embed_dim", "encoder_depth", "decoder_embed_dim", "decoder_depth", "mlp_ratio",
                "buffer_size", "diffloss_d", "diffloss_w", "class_num")


def shape_signature(config: MARConfig) -> tuple:
    """Everything about a configuration that the tensor shapes reveal."""
    return (*(getattr(config, f) for f in SHAPE_FIELDS), config.seq_len, config.token_dim)


def _count(state: Mapping[str, Any], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _heads_for(width: int) -> int:
    """The head count whose head size is closest to HEAD_DIM (preferring more heads on ties)."""
    divisors = [h for h in range(1, width + 1) if width % h == 0]
    return min(divisors, key=lambda h: (abs(width / h - HEAD_DIM), -h))


def infer_config(state: Mapping[str, Any]) -> tuple[MARConfig, Optional[str]]:
    """The configuration implied by the tensor shapes of a MAR state dict, and the named one it matches (if any).

    Shapes give widths, depths, MLP ratio, buffer size (position embeddings minus seq_len), token size, class count
    and the head's depth and width; a named configuration with the same shapes supplies the rest (head counts,
    image size). Otherwise heads are chosen for a head size of 64, and tokens of 16 numbers are taken as KL-16
    latents (vae_stride 16) and other tokens as pixels (vae_stride 1).
    """
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"cannot infer the architecture: no {key} in the state dict")
        if len(state[key].shape) != ndim:
            raise CheckpointError(f"cannot infer the architecture: {key} has shape {tuple(state[key].shape)}")
        return tuple(state[key].shape)

    enc, token_dim = shape("z_proj.weight", 2)
    dec = shape("decoder_embed.weight", 2)[0]
    seq_len = shape("diffusion_pos_embed_learned", 3)[1]
    grid = math.isqrt(seq_len)
    if grid * grid != seq_len:
        raise CheckpointError(f"cannot infer the architecture: {seq_len} tokens do not form a square grid")
    stride = 16 if token_dim == 16 else 1
    inferred = MARConfig(
        img_size=grid * stride, vae_stride=stride, patch_size=1, vae_embed_dim=token_dim,
        encoder_embed_dim=enc, encoder_depth=_count(state, "encoder_blocks."),
        encoder_num_heads=_heads_for(enc),
        decoder_embed_dim=dec, decoder_depth=_count(state, "decoder_blocks."), decoder_num_heads=_heads_for(dec),
        mlp_ratio=shape("encoder_blocks.0.mlp.fc1.weight", 2)[0] / enc,
        buffer_size=shape("encoder_pos_embed_learned", 3)[1] - seq_len,
        diffloss_d=_count(state, "diffloss.net.res_blocks."), diffloss_w=shape("diffloss.net.input_proj.weight", 2)[0],
        class_num=shape("class_emb.weight", 2)[0],
    )
    for name, named in CONFIGS.items():
        if shape_signature(named) == shape_signature(inferred):
            return named, name
    return inferred, None


TRANSFORMER_FIELDS = ("encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                      "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def resolve_config(ckpt: Mapping[str, Any], state: Mapping[str, Tensor], arch: Optional[str],
                   path: Path) -> tuple[MARConfig, Optional[str]]:
    """The configuration to build and its name, if it is a named one.

    The named ``arch`` wins. Otherwise ``args``: ours hold every field; the official training script's hold the
    model name (``model="mar_base"``) and the other settings (image size, buffer, head size, ...) but not the
    transformer sizes. Without ``args`` (or a known model name in them) the sizes are inferred from the shapes.
    """
    if arch is not None:
        if arch not in CONFIGS:
            raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(CONFIGS)}")
        return CONFIGS[arch], arch
    args = ckpt.get("args")
    if args is not None and not isinstance(args, Mapping):
        args = getattr(args, "__dict__", None)
        if args is None:
            raise CheckpointError(f"{path}: 'args' is a {type(ckpt['args']).__name__}, not a dict or Namespace")
    args = dict(args or {})
    known = {f.name for f in fields(MARConfig)}
    given = {k: v for k, v in args.items() if k in known}
    if "num_sampling_steps" in given:
        given["num_sampling_steps"] = str(given["num_sampling_steps"])
    if all(f in given for f in TRANSFORMER_FIELDS):
        base, name = MARConfig(), None
    elif args.get("model") in CONFIGS:
        base, name = CONFIGS[args["model"]], args["model"]
    else:
        try:
            base, name = infer_config(state)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        if name is None:
            warnings.warn(f"{path}: no architecture in 'args' and no configuration with these shapes; the attention "
                          f"head counts ({base.encoder_num_heads}/{base.decoder_num_heads}) are a guess (head size "
                          f"{HEAD_DIM}): pass --arch if outputs look wrong", stacklevel=3)
    try:
        config = replace(base, **given)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unusable 'args' ({_first_line(err)})") from None
    if name is None:
        name = next((n for n, c in CONFIGS.items() if c == config), None)
    elif shape_signature(CONFIGS[name]) != shape_signature(config):
        name = None  # the args changed the architecture of the named model
    return config, name


def _sampling_defaults(ckpt: Mapping[str, Any], name: Optional[str], path: Path) -> SamplingSettings:
    stored = ckpt.get("sampling")
    if isinstance(stored, Mapping):
        known = {f.name for f in fields(SamplingSettings)}
        try:
            return SamplingSettings(**{k: v for k, v in stored.items() if k in known})
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: unusable 'sampling' settings ({_first_line(err)})") from None
    return OFFICIAL_SAMPLING.get(name or "", SamplingSettings())


# --- the entry point ---------------------------------------------------------------------------------------
def load_model(name_or_path: str | Path, arch: Optional[str] = None, device: str | torch.device = "cpu") -> MAR:
    """The embedded model by name ("digits"), a downloaded official one by name ("mar_base", lazymar.download) or
    a MAR checkpoint by path, in eval mode.

    EMA weights are used when present. ``arch`` names a configuration (mar_base, mar_large, mar_huge, ...) that
    overrides the checkpoint's ``args``; without either, the architecture is inferred from the tensor shapes.
    ``model.sampling_defaults`` holds the checkpoint's sampling settings (the released ones for official models),
    ``model.arch`` the matching configuration name or None, ``model.weights`` which entry the weights came from.
    """
    path = EMBEDDED.get(str(name_or_path)) or resolve_download(name_or_path, "model")  # mar_base: downloaded
    if str(name_or_path) in EMBEDDED and not path.is_file():
        raise CheckpointError(f"the embedded {name_or_path!r} checkpoint is missing: {path} (`lazymar train` makes it)")
    ckpt = read_checkpoint(path)
    state, source = select_state_dict(ckpt, path)
    config, name = resolve_config(ckpt, state, arch, path)
    for part, width, heads in (("encoder", config.encoder_embed_dim, config.encoder_num_heads),
                               ("decoder", config.decoder_embed_dim, config.decoder_num_heads)):
        if heads < 1 or width % heads:
            raise CheckpointError(f"{path}: {part} width {width} is not divisible by its {heads} attention heads")
    try:
        with torch.device("meta"):
            expected = MAR(config).state_dict()
    except Exception as err:  # noqa: BLE001 - an impossible configuration, e.g. from bad args
        raise CheckpointError(f"{path}: cannot build a MAR from its configuration ({_first_line(err)})") from None
    check_state_dict(expected, state, path, source)
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{path} ({source}): tensor {bad} holds non-finite values (NaN or inf)")
    model = MAR(config, sampling_defaults=_sampling_defaults(ckpt, name, path))
    model.load_state_dict(state)
    model.arch, model.weights = name, source
    try:
        return model.eval().to(device)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot move the model to device {device!r} ({_first_line(err)})") from None
