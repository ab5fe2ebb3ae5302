"""Training MAR (the official objective): random-order masking, label dropout, diffusion loss on masked tokens."""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import MARConfig
from .errors import SettingsError
from .model import MAR
from .orders import random_orders
from .sampling import SamplingSettings


def sample_mask_rate(generator: torch.Generator, low: float = 0.7) -> float:
    """MAR's masking rate: a normal(1, 0.25) truncated to [low, 1]."""
    a = torch.special.ndtr(torch.tensor((low - 1.0) / 0.25, dtype=torch.float64))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return float(1.0 + 0.25 * torch.special.ndtri(a + u * (0.5 - a)))


def mar_loss(model: MAR, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """The loss of one batch of (B, C, H, W) latents: diffusion loss on the masked tokens only."""
    cfg = model.config
    tokens = model.patchify(images)
    B, L, _ = tokens.shape
    orders = random_orders(B, L, generator, tokens.device)
    num_masked = math.ceil(L * sample_mask_rate(generator))
    mask = torch.zeros(B, L, device=tokens.device).scatter_(1, orders[:, :num_masked], 1.0)
    dropped = torch.rand(B, generator=generator, device=tokens.device) < cfg.label_drop_prob
    class_embedding = model.class_embedding(torch.where(dropped, -1, labels), B)
    z = model.forward_transformer(tokens, mask, class_embedding)
    mul = cfg.diffusion_batch_mul
    target = tokens.reshape(B * L, -1).repeat(mul, 1)
    z = z.reshape(B * L, -1).repeat(mul, 1)
    loss = model.diffloss.train_diffusion.training_loss(model.diffloss.net, target, z, generator)
    weights = mask.reshape(-1).repeat(mul)
    return (loss * weights).sum() / weights.sum()


def train(config: MARConfig, images: Tensor, labels: Tensor, steps: int = 500, batch_size: int = 128,
          lr: float = 5e-4, ema_decay: float = 0.995, grad_clip: float = 3.0, warmup: int = 50, seed: int = 0,
          log_every: int = 10, progress: bool = True, state_path: Optional[Path] = None,
          save_every: int = 50, snapshot: Optional[Callable[[int, MAR, MAR, list[dict]], None]] = None,
          save_at: Iterable[int] = ()) -> tuple[MAR, MAR, list[dict]]:
    """Train from scratch; returns (model, EMA model, log). Deterministic for a seed on one machine.

    With ``state_path`` the run saves its whole state (weights, EMA, optimiser, random streams, log) there every
    ``save_every`` steps and, if the file exists, resumes from it: a killed run restarted with the same settings
    continues where it stopped and ends with the weights an uninterrupted run would have. ``snapshot(steps_done,
    model, ema, log)`` is called after each step count in ``save_at`` (intermediate checkpoints).
    """
    check_training(config, steps=steps, batch_size=batch_size, lr=lr)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = MAR(config).train()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    log, first_step, seconds_before = [], 0, 0.0
    settings = {"config": config.to_dict(), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                "ema_decay": ema_decay}
    save_at = set(save_at)
    if state_path is not None and Path(state_path).is_file():
        first_step, log = _load_state(Path(state_path), settings, model, ema, opt, generator)
        seconds_before = log[-1]["seconds"] if log else 0.0
    start = time.time()
    bar = tqdm(range(first_step, steps), desc="train", disable=not progress, initial=first_step, total=steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        loss = mar_loss(model, images[idx], labels[idx], generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - ema_decay)
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                        "lr": opt.param_groups[0]["lr"], "seconds": seconds_before + time.time() - start})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if snapshot is not None and step + 1 in save_at:
            snapshot(step + 1, model, ema, log)
        if state_path is not None and ((step + 1) % save_every == 0 or step == steps - 1):
            _save_state(Path(state_path), settings, step + 1, model, ema, opt, generator, log)
    return model, ema, log


def _save_state(path: Path, settings: dict, next_step: int, model: MAR, ema: MAR, opt: torch.optim.Optimizer,
                generator: torch.Generator, log: list[dict]) -> None:
    """Written to a temporary file and renamed, so a kill mid-write leaves the previous state intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"settings": settings, "next_step": next_step, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "log": log}, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, settings: dict, model: MAR, ema: MAR, opt: torch.optim.Optimizer,
                generator: torch.Generator) -> tuple[int, list[dict]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("settings") != settings:
        raise SettingsError(f"{path} is the state of a run with other settings ({state.get('settings')}); "
                            "delete it or train with those settings")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["next_step"], state["log"]


def save_checkpoint(path: Path, model: MAR, ema: MAR, sampling: SamplingSettings, log: Optional[list[dict]] = None,
                    extra_args: Optional[dict] = None) -> None:
    """Official layout ({"model", "model_ema", "args"}) plus our "sampling" defaults and "train_log"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = {**model.config.to_dict(), **(extra_args or {})}
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "args": args,
                "sampling": sampling.__dict__.copy(), "train_log": log or []}, path)


def plot_loss(log: list[dict], path: Path, title: str = "MAR digits training") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("diffusion loss (masked tokens)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_log(log: list[dict], path: Path) -> None:
    Path(path).write_text(json.dumps(log, indent=1))


def check_training(config: MARConfig, steps: int, batch_size: int, lr: float) -> None:
    """SettingsError for settings that would fail inside torch (or train nothing), before any work."""
    for part in ("encoder", "decoder"):
        width, heads = getattr(config, f"{part}_embed_dim"), getattr(config, f"{part}_num_heads")
        depth = getattr(config, f"{part}_depth")
        if width < 1 or heads < 1 or width % heads:
            raise SettingsError(f"{part} width {width} must be a positive multiple of its {heads} attention heads")
        if depth < 1:
            raise SettingsError(f"{part} depth must be >= 1, got {depth}")
    for name, value in (("steps", steps), ("batch size", batch_size)):
        if value < 1:
            raise SettingsError(f"{name} must be >= 1, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise SettingsError(f"learning rate must be a finite number > 0, got {lr}")


def training_outputs(out: Path) -> list[Path]:
    """The files :func:`train_digits` writes: the checkpoint, its training log and its loss curve."""
    out = Path(out)
    return [out, out.with_name(out.stem + "_train_log.json"), out.with_name(out.stem + "_loss.png")]


DIGITS_SAMPLING = SamplingSettings(num_iter=64, cfg=3.0, cfg_schedule="linear", temperature=1.0)
# the configurations train_digits can train (lazymar.config) and the optimiser steps of their committed checkpoints:
# digits16's 4-channel tokens need longer for its head to stop leaving pixel noise (README, "The two embedded models")
TRAINING_STEPS = {"digits": 600, "digits16": 1000}
EMBEDDED_MODELS = tuple(TRAINING_STEPS)


def training_state(out: Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state (deleted when the run ends)."""
    out = Path(out)
    return out.with_name(out.stem + "_train_state.pth")


def snapshot_path(out: Path, steps_done: int) -> Path:
    """The intermediate checkpoint of a run writing ``out`` after ``steps_done`` optimiser steps."""
    out = Path(out)
    return out.with_name(f"{out.stem}_step{steps_done}.pth")


def train_digits(out: Path, steps: Optional[int] = None, seed: int = 0, batch_size: int = 128, lr: float = 5e-4,
                 sampling: SamplingSettings = DIGITS_SAMPLING, progress: bool = True, model: str = "digits",
                 save_at: Iterable[int] = (), **config_overrides) -> Path:
    """Train an embedded digits MAR (``digits``: 8x8 pixels as tokens; ``digits16``: the images upsampled to 32x32,
    2x2 patches as tokens) on the fixed train split; writes the checkpoint, its log and loss curve. Resumes from
    :func:`training_state` if a killed run left one. ``steps``: default the committed checkpoint's
    (:data:`TRAINING_STEPS`). ``save_at``: step counts after which an intermediate checkpoint is written to
    :func:`snapshot_path` (for studies over training; git ignores them)."""
    from .config import get_config
    from .digits import digits_split

    if model not in EMBEDDED_MODELS:
        raise SettingsError(f"unknown embedded model {model!r}; known: {', '.join(EMBEDDED_MODELS)}")
    config = get_config(model, **config_overrides)
    steps = TRAINING_STEPS[model] if steps is None else steps
    check_training(config, steps=steps, batch_size=batch_size, lr=lr)
    bad = [s for s in save_at if not 1 <= s < steps]
    if bad:
        raise SettingsError(f"--save-at steps must lie in [1, {steps - 1}] (the run has {steps} steps), got {bad}")
    if not 1 <= sampling.num_iter <= config.seq_len:
        raise SettingsError(f"stored sampling steps must lie in [1, {config.seq_len}] (the model's tokens), "
                            f"got {sampling.num_iter}")
    images, labels = digits_split("train", size=config.img_size)
    state = training_state(out)
    recipe = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr}

    def snapshot(done: int, model_now: MAR, ema_now: MAR, log_now: list[dict]) -> None:
        save_checkpoint(snapshot_path(out, done), model_now, ema_now, sampling, log_now,
                        extra_args={**recipe, "steps_done": done})

    trained, ema, log = train(config, images, labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              progress=progress, state_path=state, snapshot=snapshot, save_at=save_at)
    out, log_path, loss_path = training_outputs(out)
    save_checkpoint(out, trained, ema, sampling, log, extra_args=recipe)
    write_log(log, log_path)
    plot_loss(log, loss_path, title=f"MAR {model} training")
    state.unlink(missing_ok=True)
    return out
