"""A live capture of per-step features for what a recording does not keep (the step x step similarity, absolute
changes of the CFG branches), and the tables computed from it. Meant for a few samples: memory grows with the steps."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .phenomena import AnalysisError, layer_group


# --- live capture (what a recording does not keep) --------------------------------------------------------
def capture_step_features(model, labels: Sequence[int], settings, layers: Sequence[str] = ("decoder.3",),
                          seed: int = 0, runner=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Generate ``labels`` once and keep every step's output of the given decoder blocks ("decoder.i") and of
    z, all rows: {layer: (steps, rows, positions, dim)} with rows [cond; uncond] under CFG (B rows without).
    Decoder blocks cover buffer + sequence positions, z the sequence positions. Memory grows with the steps:
    meant for a few samples. ``progress``: a tqdm bar over the MAR steps."""
    from lazymar.sampling import StepObserver, generate, observe_steps

    captured: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    depth = len(model.decoder_blocks)
    for layer in layers:
        group = layer_group(layer)
        if group == "decoder":
            index = int(layer.split(".")[1])
            if not 0 <= index < depth:
                raise AnalysisError(f"layer {layer!r} out of range: the decoder has {depth} blocks")
            handles.append(model.decoder_blocks[index].register_forward_hook(
                lambda module, args, out, layer=layer: captured[layer].append(out.detach().clone())))
        elif group != "z":
            raise AnalysisError(f"capture_step_features supports decoder.i and z (the encoder sees a different "
                                f"set of tokens at each step), got {layer!r}")

    class _ZObserver(StepObserver):
        def on_step_end(self, ctx) -> None:
            if "z" in captured:
                captured["z"].append(ctx.z.detach().clone())

    try:
        with observe_steps(_ZObserver()):
            generate(model, list(labels), settings, seed=seed, runner=runner, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for layer, steps in captured.items():
        if len(steps) != settings.num_iter:
            raise AnalysisError(f"captured {len(steps)} calls of {layer} for {settings.num_iter} steps: the runner "
                                "skips or repeats blocks; capture with the plain runner")
        out[layer] = torch.stack(steps)
    return out


def step_similarity_matrix(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """(S, S) mean cosine similarity between the features of steps i and j, over rows and positions, from
    features of shape (S, rows, positions, dim). The diagonal is 1 (for nonzero features)."""
    f = torch.as_tensor(features, dtype=torch.float64)
    if f.ndim != 4:
        raise AnalysisError(f"features must be (steps, rows, positions, dim), got shape {tuple(f.shape)}")
    unit = torch.nn.functional.normalize(f, dim=-1)
    S = unit.shape[0]
    flat = unit.reshape(S, -1, unit.shape[-1])
    sim = torch.einsum("ind,jnd->ij", flat, flat) / flat.shape[1]
    return sim.numpy()


def absolute_change(features: torch.Tensor | np.ndarray, use_cfg: bool = True) -> pd.DataFrame:
    """From features (S, rows, positions, dim) with rows [cond; uncond]: per step s >= 1, the mean over samples
    and positions of ||c_s - c_{s-1}||, ||u_s - u_{s-1}|| and ||r_s - r_{s-1}|| with r = c - u, and the
    ratios of the branch changes to the residual change (absolute, not relative, changes)."""
    f = torch.as_tensor(features, dtype=torch.float64)
    if f.ndim != 4 or f.shape[0] < 2:
        raise AnalysisError(f"features must be (steps >= 2, rows, positions, dim), got shape {tuple(f.shape)}")
    if not use_cfg or f.shape[1] % 2:
        raise AnalysisError("absolute_change needs CFG features: rows [cond; uncond]")
    B = f.shape[1] // 2
    cond, uncond = f[:, :B], f[:, B:]
    residual = cond - uncond
    rows = {}
    for name, x in (("cond", cond), ("uncond", uncond), ("residual", residual)):
        rows[f"{name}_change"] = torch.linalg.vector_norm(x[1:] - x[:-1], dim=-1).mean(dim=(1, 2)).numpy()
    df = pd.DataFrame(rows, index=pd.Index(np.arange(1, f.shape[0]), name="step"))
    df["cond_over_residual"] = df["cond_change"] / df["residual_change"]
    df["uncond_over_residual"] = df["uncond_change"] / df["residual_change"]
    return df


def overall_change_ratio(change: pd.DataFrame) -> dict[str, float]:
    """Branch change over residual change summed over all steps (a total-variation ratio) from
    :func:`absolute_change` or :func:`branch_vs_residual` columns."""
    residual = float(change["residual_change"].sum())
    if residual <= 0:
        raise AnalysisError("the residual never changes: the ratio is undefined")
    return {"cond_over_residual": float(change["cond_change"].sum()) / residual,
            "uncond_over_residual": float(change["uncond_change"].sum()) / residual}
