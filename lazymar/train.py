"""Training MAR (the official objective): random-order masking, label dropout, diffusion loss on masked tokens."""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import MARConfig
from .errors import SettingsError
from .model import MAR
from .sampling import SamplingSettings, random_orders


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
          log_every: int = 10, progress: bool = True) -> tuple[MAR, MAR, list[dict]]:
    """Train from scratch; returns (model, EMA model, log). Deterministic for a seed on one machine."""
    check_training(config, steps=steps, batch_size=batch_size, lr=lr)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = MAR(config).train()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    log, start = [], time.time()
    bar = tqdm(range(steps), desc="train", disable=not progress)
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
                        "lr": opt.param_groups[0]["lr"], "seconds": time.time() - start})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model, ema, log


def save_checkpoint(path: Path, model: MAR, ema: MAR, sampling: SamplingSettings, log: Optional[list[dict]] = None,
                    extra_args: Optional[dict] = None) -> None:
    """Official layout ({"model", "model_ema", "args"}) plus our "sampling" defaults and "train_log"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = {**model.config.to_dict(), **(extra_args or {})}
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "args": args,
                "sampling": sampling.__dict__.copy(), "train_log": log or []}, path)


def plot_loss(log: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("diffusion loss (masked tokens)")
    ax.set_title("MAR digits training")
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


def train_digits(out: Path, steps: int = 600, seed: int = 0, batch_size: int = 128, lr: float = 5e-4,
                 sampling: SamplingSettings = DIGITS_SAMPLING, progress: bool = True, **config_overrides) -> Path:
    """Train the embedded digits MAR on the fixed train split; writes the checkpoint, its log and loss curve."""
    from .config import get_config
    from .digits import digits_split

    config = get_config("digits", **config_overrides)
    check_training(config, steps=steps, batch_size=batch_size, lr=lr)
    if not 1 <= sampling.num_iter <= config.seq_len:
        raise SettingsError(f"stored sampling steps must lie in [1, {config.seq_len}] (the model's tokens), "
                            f"got {sampling.num_iter}")
    images, labels = digits_split("train")
    model, ema, log = train(config, images, labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            progress=progress)
    out, log_path, loss_path = training_outputs(out)
    save_checkpoint(out, model, ema, sampling, log,
                    extra_args={"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr})
    write_log(log, log_path)
    plot_loss(log, loss_path)
    return out
