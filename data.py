"""Training and evaluation data: boxes as text, the conversation format, real dataset readers,
the procedural shapes world, and batching.

Every box in this project is `[x1,y1,x2,y2]` with values in [0, 1], three decimals, relative to the
image padded to a square (pasted centred, LLaVA style). This file owns that convention.
"""

import re

# ----------------------------------------------------------------------------- boxes as text

_NUM = r"\s*([-+]?\d*\.?\d+)\s*"
BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def format_box(box) -> str:
    """[x1,y1,x2,y2] in [0,1] -> '[0.123,0.456,0.789,1.000]' (clamped, three decimals)."""
    return "[" + ",".join(f"{min(max(float(v), 0.0), 1.0):.3f}" for v in box) + "]"


def parse_boxes(text: str) -> list[list[float]]:
    """Every `[a,b,c,d]` in `text` (spaces tolerated), in order. Values are not clamped."""
    return [[float(g) for g in m.groups()] for m in BOX_RE.finditer(text)]


def pad_offsets(width: int, height: int) -> tuple[int, int, int]:
    """Side S of the padded square and the (left, top) offsets where the image is pasted."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def box_to_pixels(box, width: int, height: int) -> list[float]:
    """Normalized box on the padded square -> pixel box on the original image, clipped to it."""
    side, left, top = pad_offsets(width, height)
    x1, y1, x2, y2 = (v * side for v in box)
    clip = lambda v, hi: min(max(v, 0.0), float(hi))
    return [clip(x1 - left, width), clip(y1 - top, height), clip(x2 - left, width), clip(y2 - top, height)]


def pixels_to_box(box_px, width: int, height: int) -> list[float]:
    """Pixel box [x1,y1,x2,y2] on the original image -> normalized box on the padded square."""
    side, left, top = pad_offsets(width, height)
    x1, y1, x2, y2 = box_px
    return [(x1 + left) / side, (y1 + top) / side, (x2 + left) / side, (y2 + top) / side]


def iou(a, b) -> float:
    """Intersection over union of two [x1,y1,x2,y2] boxes in the same frame; 0 for degenerate boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0
