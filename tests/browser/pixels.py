"""What a sample grid looks like in pixels: the cells of analysis.schedule_plots.plot_sample_comparison, each an image
framed in SAMPLE_FRAME_COLOR, found in a PNG (a browser's screenshot of the element, or the figure itself).

A cell is a connected ring of frame-coloured pixels; it is drawn when its inside holds both ink and background
(a digit, not an empty or a solid box). A blank or partly drawn grid has fewer drawn cells than expected.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import to_rgb
from PIL import Image
from scipy import ndimage

from analysis.schedule_plots import SAMPLE_FRAME_COLOR

FRAME_RGB = np.array(to_rgb(SAMPLE_FRAME_COLOR)) * 255
MIN_CELL_PX = 12  # a cell's frame spans at least this many pixels each way


@dataclass(frozen=True)
class Cell:
    top: int
    left: int
    height: int
    width: int
    ink: float  # share of dark pixels inside the frame

    @property
    def drawn(self) -> bool:
        return 0.02 <= self.ink <= 0.98


def rgb_of(png: bytes) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a PNG, composited over white."""
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, image).convert("RGB"))


def sample_cells(png: bytes) -> list[Cell]:
    """The framed cells of a sample grid, in reading order (rows top to bottom, then left to right)."""
    rgb = rgb_of(png).astype(float)
    frame = np.abs(rgb - FRAME_RGB).max(axis=2) < 60
    labels, count = ndimage.label(frame, structure=np.ones((3, 3)))
    gray = rgb.mean(axis=2)
    cells = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
        if height < MIN_CELL_PX or width < MIN_CELL_PX:
            continue
        ring = (labels[box] == index).sum()
        if ring > 0.5 * height * width:  # a filled blob, not a frame
            continue
        inside = gray[box[0].start + 3:box[0].stop - 3, box[1].start + 3:box[1].stop - 3]
        cells.append(Cell(box[0].start, box[1].start, height, width, float((inside < 128).mean())))
    row_height = max((c.height for c in cells), default=1)
    return sorted(cells, key=lambda c: (round(c.top / row_height), c.left))


def check_sample_grid(png: bytes, expected_cells: int) -> list[Cell]:
    """The cells, after asserting that there are ``expected_cells`` and every one shows a drawn image."""
    cells = sample_cells(png)
    blank = [i for i, cell in enumerate(cells) if not cell.drawn]
    assert len(cells) == expected_cells and not blank, (
        f"the sample grid shows {len(cells)} framed cells (expected {expected_cells}); blank cells: {blank}; "
        f"image {rgb_of(png).shape[1]}x{rgb_of(png).shape[0]} px")
    return cells
