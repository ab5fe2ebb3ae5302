"""Sample grids: one row per class label, saved as PNG (and PDF when asked); reading labels from the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from torch import Tensor


def save_sample_grid(images: Tensor, labels: Sequence[int], path: str | Path, title: Optional[str] = None,
                     class_names: Optional[Sequence[str]] = None) -> Path:
    """Images (N, C, H, W) in [-1, 1], grouped into rows by label (in order of first appearance)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [int(l) for l in labels]
    rows = list(dict.fromkeys(labels))
    by_row = {r: [i for i, l in enumerate(labels) if l == r] for r in rows}
    ncols = max(len(v) for v in by_row.values())
    pics = ((images.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    fig, axes = plt.subplots(len(rows), ncols, figsize=(0.7 * ncols + 0.6, 0.7 * len(rows) + 0.4), squeeze=False)
    for r, label in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(by_row[label]):
                pic = pics[by_row[label][c]]
                ax.imshow(pic[..., 0] if pic.shape[-1] == 1 else pic, cmap="gray_r" if pic.shape[-1] == 1 else None,
                          vmin=0, vmax=1, interpolation="nearest")
            if c == 0:
                name = class_names[label] if class_names else ("uncond" if label < 0 else str(label))
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


class Labels(tuple):
    """Class labels parsed once from "0,1,2" or "0-9" (-1 = unconditional): a tuple of ints that keeps the
    ``text`` it was given. ValueError on a bad text."""

    text: str

    def __new__(cls, text: "str | Labels") -> "Labels":
        if isinstance(text, Labels):
            return text
        value = super().__new__(cls, parse_labels(text))
        value.text = text
        return value

    def __str__(self) -> str:
        return self.text

    def __getnewargs__(self) -> tuple[str]:  # copies and pickles rebuild it from its text
        return (self.text,)


def parse_labels(text: str) -> list[int]:
    """"0,1,2" or "0-9" -> a list of ints, with a clear error on anything else (a descending range included)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            lo, hi = (int(v) for v in part.split("-", 1)) if "-" in part[1:] else (int(part), int(part))
        except ValueError:
            raise ValueError(f"cannot read labels {text!r}: use e.g. 0,1,2 or 0-9") from None
        if hi < lo:
            raise ValueError(f"cannot read labels {text!r}: the range {part} is empty (did you mean {hi}-{lo}?)")
        out += list(range(lo, hi + 1))
    return out
