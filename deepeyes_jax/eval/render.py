"""Render one multi-turn "thinking with images" trajectory as a single picture for humans.

`render_trajectory` returns an RGB `PIL.Image.Image` of the requested width whose height grows
with the content: on the left the original image scaled to `LEFT_W` pixels wide with the
ground-truth box (green) and the numbered zoom boxes (orange-red); on the right the question and
each assistant turn (wrapped text, then the crop the model was shown for that turn's zoom, then
any tool error in red); across the bottom a "ground truth: X  -  correct/wrong" footer.
`save_grid` writes several renderings into one PNG. PIL only, so it runs wherever the data does.
The default font covers little beyond ASCII (no em dash, no accents, no CJK): other characters
render as boxes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LEFT_W = 400  # width of the original-image panel
THUMB = 160  # longest side of a crop thumbnail
PAD = 12
BOX_LINE = 3

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (110, 110, 110)
HEADER_COLOUR = (30, 70, 160)
GT_COLOUR = (0, 170, 0)
ZOOM_COLOUR = (255, 90, 0)  # orange-red: distinct from the green gt box and the red errors
ERROR_COLOUR = (210, 0, 0)
CORRECT_COLOUR = (0, 140, 0)

FONT = ImageFont.load_default(size=14)  # pillow >= 10.1 ships a scalable default font
LINE_H = sum(FONT.getmetrics()) + 3


def _fit_chars(word: str, width: int) -> int:
    """Longest prefix of `word` (at least 1 char, to make progress) that fits in `width` px."""
    lo, hi = 1, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if FONT.getlength(word[:mid]) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels, keeping the text's own line breaks."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if FONT.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            # Tool-call JSON and the like can be one "word" wider than the column: cut it.
            while FONT.getlength(word) > width:
                cut = _fit_chars(word, width)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


class _Column:
    """Stacks wrapped text and images top to bottom; drawn once the canvas height is known."""

    def __init__(self, x: int, width: int, y: int = PAD):
        self.x, self.width, self.y = x, width, y
        self._texts: list[tuple[int, str, tuple]] = []
        self._images: list[tuple[int, Image.Image, tuple | None]] = []

    def text(self, text: str, colour: tuple = BLACK) -> None:
        for line in _wrap(text, self.width):
            self._texts.append((self.y, line, colour))
            self.y += LINE_H

    def image(self, img: Image.Image, outline: tuple | None = None) -> None:
        # The outline sits outside the image so the pixels themselves stay untouched.
        self.y += 2 if outline else 0
        self._images.append((self.y, img, outline))
        self.y += img.height + (2 if outline else 0) + 4

    def gap(self, height: int = PAD) -> None:
        self.y += height

    def draw(self, canvas: Image.Image) -> None:
        draw = ImageDraw.Draw(canvas)
        for y, img, outline in self._images:
            if outline:
                draw.rectangle([self.x, y - 2, self.x + img.width + 3, y + img.height + 1],
                               fill=outline)
            canvas.paste(img, (self.x + (2 if outline else 0), y))
        for y, line, colour in self._texts:
            draw.text((self.x, y), line, fill=colour, font=FONT)


def _scaled_box(box, sx: float, sy: float) -> list[int]:
    """Original-pixel [x1, y1, x2, y2] (x2, y2 exclusive) -> inclusive panel pixel corners."""
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    return [round(x1 * sx), round(y1 * sy), max(round(x1 * sx), round(x2 * sx) - 1),
            max(round(y1 * sy), round(y2 * sy) - 1)]


def _image_panel(image, gt_box, zoom_boxes) -> Image.Image:
    """The original image scaled to LEFT_W wide, gt box underneath, zoom boxes numbered on top."""
    original = Image.fromarray(np.asarray(image)).convert("RGB")
    height = max(1, round(original.height * LEFT_W / original.width))
    panel = original.resize((LEFT_W, height), Image.Resampling.LANCZOS)
    sx, sy = LEFT_W / original.width, height / original.height
    draw = ImageDraw.Draw(panel)
    if gt_box is not None:
        draw.rectangle(_scaled_box(gt_box, sx, sy), outline=GT_COLOUR, width=BOX_LINE)
    for number, box in enumerate(zoom_boxes, start=1):
        corners = _scaled_box(box, sx, sy)
        draw.rectangle(corners, outline=ZOOM_COLOUR, width=BOX_LINE)
        label = str(number)
        left, top, right, bottom = FONT.getbbox(label)
        x, y = corners[0], corners[1]
        draw.rectangle([x, y, x + right - left + 5, y + bottom - top + 5], fill=ZOOM_COLOUR)
        draw.text((x + 3 - left, y + 3 - top), label, fill=WHITE, font=FONT)
    return panel


def _thumbnail(crop) -> Image.Image:
    img = Image.fromarray(np.asarray(crop)).convert("RGB")
    scale = THUMB / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    # Upscaling uses NEAREST so the model's actual pixels stay visible; big crops shrink smoothly.
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return img.resize(size, resample)


def render_trajectory(image, question: str, turns: list[dict], *, gt_box=None, answer=None,
                      correct: bool | None = None, width: int = 900) -> Image.Image:
    """Render a trajectory; returns an RGB image `width` pixels wide (layout in the module doc).

    turns: one dict per assistant turn with "text", "bbox" (zoom box in original-image pixels or
    None), "crop" (uint8 [h, w, 3] image shown for that zoom, or None), "error" (str or None).
    Zoom boxes are numbered in turn order, counting only turns with a bbox.
    """
    right_x = PAD + LEFT_W + PAD
    if width - right_x - PAD < THUMB:
        raise ValueError(f"width {width} leaves no room for the text column (need >= "
                         f"{right_x + THUMB + PAD})")
    zoom_boxes = [turn["bbox"] for turn in turns if turn.get("bbox") is not None]

    left = _Column(PAD, LEFT_W)
    left.image(_image_panel(image, gt_box, zoom_boxes))
    legend = "zoom boxes: orange, numbered by turn order"
    left.text(legend if gt_box is None else "ground-truth box: green;  " + legend, GREY)

    right = _Column(right_x, width - right_x - PAD)
    right.text("Question", HEADER_COLOUR)
    right.text(question)
    zoom_number = 0
    for index, turn in enumerate(turns, start=1):
        right.gap()
        right.text(f"Turn {index}", HEADER_COLOUR)
        right.text(turn.get("text") or "")
        if turn.get("bbox") is not None:
            zoom_number += 1
            right.text(f"zoom {zoom_number}: {list(turn['bbox'])}", ZOOM_COLOUR)
        if turn.get("crop") is not None:
            right.image(_thumbnail(turn["crop"]), outline=ZOOM_COLOUR)
        if turn.get("error"):
            right.text(f"tool error: {turn['error']}", ERROR_COLOUR)

    footer_y = max(left.y, right.y) + PAD
    footer = _Column(PAD, width - 2 * PAD, y=footer_y + 6)  # 6: below the separator line
    parts = []
    if answer is not None:
        parts.append(f"ground truth: {answer}")
    if correct is not None:
        parts.append("correct" if correct else "wrong")
    if parts:
        footer.text("  -  ".join(parts),
                    BLACK if correct is None else CORRECT_COLOUR if correct else ERROR_COLOUR)

    canvas = Image.new("RGB", (width, (footer.y if parts else footer_y) + PAD), WHITE)
    for column in (left, right, footer):
        column.draw(canvas)
    if parts:
        ImageDraw.Draw(canvas).line([PAD, footer_y, width - PAD, footer_y], fill=GREY)
    return canvas


def save_grid(images: list[Image.Image], path: str, *, columns: int = 1) -> None:
    """Write `images` as one PNG grid, row-major, PAD pixels between cells (none around)."""
    if not images:
        raise ValueError("save_grid needs at least one image")
    rows = [images[i:i + columns] for i in range(0, len(images), columns)]
    col_w = [max(img.width for img in images[c::columns]) for c in range(len(rows[0]))]
    row_h = [max(img.height for img in row) for row in rows]
    grid = Image.new("RGB", (sum(col_w) + PAD * (len(col_w) - 1),
                             sum(row_h) + PAD * (len(rows) - 1)), WHITE)
    y = 0
    for row, height in zip(rows, row_h):
        x = 0
        for img, cell_w in zip(row, col_w):
            grid.paste(img, (x, y))
            x += cell_w + PAD
        y += height + PAD
    grid.save(path, format="PNG")
