"""V*-mini: procedural, seeded V*-Bench-style scenes whose questions need a zoom on a small object.

`make_scene(index, seed=, split=)` deterministically gives a 448x448 muted textured background with one
large shape and a few small (24-32 px) shapes or letter tiles, one per grid cell away from the large
shape, plus a 4- or 2-option question about either a small object (hard: shape, letter, letter colour,
relative position of a same-coloured pair) or the large one (easy). Small objects have unique colours
so "the small {colour} ..." names exactly one object (or the one pair).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (240, 220, 30),
           "purple": (150, 40, 200), "orange": (250, 140, 20)}
LETTER_COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), **COLOURS}
SHAPES = ("circle", "square", "triangle", "cross")
LETTERS = ("T", "L", "X", "H")
STRIPES = ("horizontal", "vertical", "rising", "falling")
HARD_KINDS = ("shape", "letter", "letter_colour", "relative_position", "stripes")
TILE_DETAILS = ("letter", "stripes")
EASY_KINDS = ("large_colour", "large_shape")
SPLIT_IDS = {"train": 0, "test": 1}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    size: int = 448  # square canvas side, px
    grid: int = 4  # small objects live in grid x grid cells of size // grid px
    small_size: tuple[int, int] = (24, 32)  # inclusive side range of small objects
    large_size: tuple[int, int] = (150, 210)
    num_small: tuple[int, int] = (4, 6)  # inclusive, counting the target(s)
    hard_fraction: float = 0.75
    kinds: tuple[str, ...] = ("shape", "letter", "letter_colour", "relative_position") + EASY_KINDS
    margin: int = 6  # px kept free around the large object and inside cell borders
    letter_stroke: float = 1 / 8  # letter stroke width / tile side (>= 3 px)
    # What a tile carries: a letter (`letter`, `letter_colour` questions) or stripes of one of `STRIPES`
    # orientations in a darker shade of its colour (`stripes`). Stripes `stripe_width` px wide with equal
    # gaps average out under a >= 4x downscale (every orientation gives the same mean colour: unreadable at
    # the scene budget) and stay >= 2 x stripe_width px wide in a crop magnified 2x.
    tile_detail: str = "letter"
    stripe_width: int = 5
    # > 0: a grey background whose red channel rises by this much from left to right and blue channel
    # from top to bottom, like uneven lighting. Qwen2.5-VL has no absolute position embedding; the tint
    # makes an image token's position linearly readable from its features (README: V*-mini diagnosis).
    position_tint: int = 0

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in HARD_KINDS + EASY_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown question kind(s) {unknown} (known: {HARD_KINDS + EASY_KINDS})")
        if self.tile_detail not in TILE_DETAILS:
            raise ValueError(f"tile_detail {self.tile_detail!r}; choose one of {TILE_DETAILS}")
        detail_kinds = {"letter": ("letter", "letter_colour"), "stripes": ("stripes",)}
        asked = [k for k in self.kinds for d, ks in detail_kinds.items() if k in ks and d != self.tile_detail]
        if asked:
            raise ValueError(f"question kind(s) {asked} need tiles with another detail than "
                             f"tile_detail={self.tile_detail!r}")
        if self.stripe_width < 1:
            raise ValueError(f"stripe_width {self.stripe_width} must be >= 1 px")


def format_question(q: str, options: list[str]) -> str:
    """DeepEyes' V* eval prompt layout, without the instruction suffix."""
    opts = "\n" + "".join(f"{letter}. {o}\n" for letter, o in zip("ABCD", options))
    return f"Question: {q}\nOptions: {opts}\n"


def crop_box(box, *, pad: float, size: int) -> list[float]:
    """[x1, y1, x2, y2] grown by `pad` px on every side, clipped to the size x size canvas."""
    x1, y1, x2, y2 = box
    return [float(max(0, x1 - pad)), float(max(0, y1 - pad)), float(min(size, x2 + pad)), float(min(size, y2 + pad))]


def _shuffled(items, rng) -> list[str]:
    return [str(items[i]) for i in rng.permutation(len(items))]


def _with_distractors(answer: str, pool, exclude, rng) -> list[str]:
    others = [c for c in pool if c != answer and c not in exclude]
    return _shuffled([answer] + [others[i] for i in rng.choice(len(others), 3, replace=False)], rng)


def question_for(scene_objects: list[dict], target_ids: list[int], kind: str, rng) -> tuple[str, list[str], str]:
    """Poses a `kind` question about objects[target_ids] (as make_scene lays them out) -> (q, options, answer).

    The target must fit the kind (a small shape, a tile, the same-coloured pair, or the large object);
    `rng` (np.random.Generator) only shuffles the options and picks distractors.
    """
    obj = scene_objects[target_ids[0]]
    colour = obj["colour"]
    if kind == "shape":
        return f"What is the shape of the small {colour} object?", _shuffled(SHAPES, rng), obj["shape"]
    if kind == "letter":
        return f"Which letter is written on the small {colour} tile?", _shuffled(LETTERS, rng), obj["letter"]
    if kind == "letter_colour":
        options = _with_distractors(obj["letter_colour"], LETTER_COLOURS, (colour,), rng)
        return f"What is the colour of the letter on the small {colour} tile?", options, obj["letter_colour"]
    if kind == "stripes":
        return (f"Which way do the stripes on the small {colour} tile run?", _shuffled(STRIPES, rng),
                obj["stripes"])
    if kind == "relative_position":
        a, b = obj, scene_objects[target_ids[1]]
        (ax, ay), (bx, by) = [((o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2) for o in (a, b)]
        what_a, what_b = f"the small {colour} {a['shape']}", f"the small {colour} {b['shape']}"
        if abs(ax - bx) >= abs(ay - by):
            q, answer = f"Is {what_a} to the left or to the right of {what_b}?", "left" if ax < bx else "right"
            return q, _shuffled(["left", "right"], rng), answer
        q, answer = f"Is {what_a} above or below {what_b}?", "above" if ay < by else "below"
        return q, _shuffled(["above", "below"], rng), answer
    if kind == "large_colour":
        return "What is the colour of the large object?", _with_distractors(colour, COLOURS, (), rng), colour
    if kind == "large_shape":
        return "What is the shape of the large object?", _shuffled(SHAPES, rng), obj["shape"]
    raise ValueError(f"unknown question kind {kind!r}")


def _luma(name: str) -> float:
    r, g, b = LETTER_COLOURS[name]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _background(rng, size: int, tint: int) -> np.ndarray:
    # Smooth greyish colour blobs + mild grey grain, kept in 90..170 so saturated objects stand out. The
    # grain is 2x2 px: per-pixel RGB noise made the stored PNGs ~300 KB and 3x slower to encode. With a
    # position tint the blobs are pure grey, so the red-green and blue-green differences are the tint.
    coarse = rng.uniform(100, 160, (5, 5, 3))
    grey = np.repeat(coarse.mean(-1, keepdims=True), 3, axis=-1)
    coarse = grey if tint else 0.4 * coarse + 0.6 * grey  # desaturated, or pure grey under a tint
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BILINEAR), np.int16)
    grain = rng.integers(-6, 7, ((size + 1) // 2, (size + 1) // 2, 1), dtype=np.int16).repeat(2, 0).repeat(2, 1)
    out = smooth + grain[:size, :size]
    if not tint:
        return np.clip(out, 90, 170).astype(np.uint8)
    ramp = np.round(np.linspace(-tint / 2, tint / 2, size)).astype(np.int16)
    out[..., 0] += ramp[None, :]
    out[..., 2] += ramp[:, None]
    return np.clip(out, 90 - tint // 2, 170 + tint // 2).astype(np.uint8)


def _stripe_mask(side: int, width: int, orientation: str) -> np.ndarray:
    """bool[side, side]: stripes `width` px wide with `width` px gaps (diagonals measured along an axis)."""
    y, x = np.mgrid[:side, :side]
    along = {"horizontal": y, "vertical": x, "rising": x + y, "falling": x - y + side}[orientation]
    return (along // width) % 2 == 0


def _shape(draw: ImageDraw.ImageDraw, o: dict, fill) -> None:
    x1, y1, x2, y2 = o["box"]
    side = x2 - x1
    x2, y2 = x2 - 1, y2 - 1  # PIL boxes are inclusive
    if o["shape"] == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=fill)
    elif o["shape"] == "triangle":
        draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=fill)
    elif o["shape"] == "cross":
        t = max(3, side // 3)
        off = (side - t) // 2
        draw.rectangle([x1, y1 + off, x2, y1 + off + t - 1], fill=fill)
        draw.rectangle([x1 + off, y1, x1 + off + t - 1, y2], fill=fill)
    else:
        draw.rectangle([x1, y1, x2, y2], fill=fill)


def _draw(draw: ImageDraw.ImageDraw, o: dict, stroke: float) -> None:
    _shape(draw, o, COLOURS[o["colour"]])
    if o["class"] != "tile" or o["stripes"]:
        return
    x1, y1, x2, y2 = o["box"]
    side, x2, y2 = x2 - x1, x2 - 1, y2 - 1
    w, ink, pad = max(3, round(side * stroke)), LETTER_COLOURS[o["letter_colour"]], side // 5
    a, b, c, d = x1 + pad, y1 + pad, x2 - pad, y2 - pad  # letter box
    mx, my = (a + c - w + 1) // 2, (b + d - w + 1) // 2  # top-left of the centred stroke
    strokes = {"T": [(a, b, c, b + w - 1), (mx, b, mx + w - 1, d)],
               "L": [(a, b, a + w - 1, d), (a, d - w + 1, c, d)],
               "H": [(a, b, a + w - 1, d), (c - w + 1, b, c, d), (a, my, c, my + w - 1)]}
    if o["letter"] == "X":
        draw.line([a, b, c, d], fill=ink, width=w)
        draw.line([a, d, c, b], fill=ink, width=w)
    for r in strokes.get(o["letter"], []):
        draw.rectangle(r, fill=ink)


def object_map(objects: list[dict], size: int) -> np.ndarray:
    """uint8[size, size]: 1 + the index of the object drawn on each pixel (0: background), as make_scene
    draws them (later objects on top)."""
    pil = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(pil)
    for i, o in enumerate(objects):
        _shape(draw, o, i + 1)
    return np.asarray(pil)


def _draw_stripes(image: np.ndarray, o: dict, width: int) -> None:
    """Paints a striped tile's stripes into `image` (uint8[H, W, 3]) in a darker shade of its colour."""
    x1, y1, x2, y2 = o["box"]
    mask = _stripe_mask(x2 - x1, width, o["stripes"])
    shade = np.round(np.array(COLOURS[o["colour"]]) * 0.4).astype(np.uint8)
    image[y1:y2, x1:x2][mask] = shade


def _obj(cls, size, shape, colour, box, letter="", letter_colour="", stripes="") -> dict:
    return {"class": cls, "size": size, "shape": shape, "colour": colour, "letter": letter,
            "letter_colour": letter_colour, "stripes": stripes, "box": [int(v) for v in box]}


def make_scene(index: int, *, seed: int, split: str, config: WorldConfig = WorldConfig()) -> dict:
    """-> dict(image uint8[size, size, 3], question (formatted) / question_text str, options list[str],
    answer str (option text), answer_letter str, kind str, hard bool, target_box [x1, y1, x2, y2] floats,
    objects list[dict] (objects[0] is the large one; box ints, exclusive end), target_ids list[int],
    data_source "vstar")."""
    cfg, rng = config, np.random.default_rng([seed, SPLIT_IDS[split], index])
    image = _background(rng, cfg.size, cfg.position_tint)
    hard_kinds = [k for k in HARD_KINDS if k in cfg.kinds]
    easy_kinds = [k for k in EASY_KINDS if k in cfg.kinds]
    hard = bool(rng.random() < cfg.hard_fraction and hard_kinds) or not easy_kinds
    kinds = hard_kinds if hard else easy_kinds
    kind = kinds[int(rng.integers(len(kinds)))]
    cell, m = cfg.size // cfg.grid, cfg.margin
    for _ in range(1000):  # resample the large object until the question's target(s) fit in a free cell
        side = int(rng.integers(cfg.large_size[0], cfg.large_size[1] + 1))
        lx, ly = (int(v) for v in rng.integers(0, cfg.size - side + 1, 2))
        free = [(cx, cy) for cy in range(0, cell * cfg.grid, cell) for cx in range(0, cell * cfg.grid, cell)
                if not (cx < lx + side + m and lx - m < cx + cell and cy < ly + side + m and ly - m < cy + cell)]
        if len(free) >= hard:
            break
    else:
        raise RuntimeError(f"no free cell for a small object in {cfg}")
    objects = [_obj("shape", "large", SHAPES[int(rng.integers(4))], list(COLOURS)[int(rng.integers(6))],
                    (lx, ly, lx + side, ly + side))]
    pair = kind == "relative_position"
    n = int(rng.integers(cfg.num_small[0], cfg.num_small[1] + 1))
    cells = [free[i] for i in rng.permutation(len(free))[:min(n - pair, len(free), len(COLOURS))]]
    colours = _shuffled(list(COLOURS), rng)
    for i, (cx, cy) in enumerate(cells):
        sides = rng.integers(cfg.small_size[0], cfg.small_size[1] + 1, 2 if (pair and i == 0) else 1)
        if len(sides) == 2:  # the pair: two different shapes side by side in one cell, 6-16 px apart
            s1, s2 = (int(s) for s in sides)
            along = s1 + int(rng.integers(6, 17)) + s2
            a0 = int(rng.integers(m, cell - m - along + 1))
            c0 = int(rng.integers(m, cell - m - max(s1, s2) + 1))
            vertical = bool(rng.integers(2))
            shapes = [SHAPES[j] for j in rng.choice(4, 2, replace=False)]
            placed = []
            for s, start, shape in zip((s1, s2), (a0, a0 + along - s2), shapes):
                across = c0 + (max(s1, s2) - s) // 2
                x, y = (cx + across, cy + start) if vertical else (cx + start, cy + across)
                placed.append(_obj("shape", "small", shape, colours[i], (x, y, x + s, y + s)))
            objects += placed[::-1] if rng.integers(2) else placed  # which one is asked about ("A") is random
            continue
        s = int(sides[0])
        x, y = (int(v) for v in rng.integers(m, cell - m - s + 1, 2))
        box = (cx + x, cy + y, cx + x + s, cy + y + s)
        # the first cell holds the target, whose class the question dictates; in the striped world it is a tile
        # in easy scenes too, so every scene has a small object to ask about (supervised tasks, skill table)
        if i == 0 and (hard or cfg.tile_detail == "stripes"):
            tile = kind in ("letter", "letter_colour", "stripes") or not hard
        else:
            tile = bool(rng.integers(2))
        if tile and cfg.tile_detail == "stripes":
            objects.append(_obj("tile", "small", "square", colours[i], box,
                                stripes=STRIPES[int(rng.integers(len(STRIPES)))]))
        elif tile:
            inks = [c for c in LETTER_COLOURS if abs(_luma(c) - _luma(colours[i])) >= 20]  # legible when zoomed
            ink = inks[int(rng.integers(len(inks)))]
            objects.append(_obj("tile", "small", "square", colours[i], box, LETTERS[int(rng.integers(4))], ink))
        else:
            objects.append(_obj("shape", "small", SHAPES[int(rng.integers(4))], colours[i], box))
    target_ids = ([1, 2] if pair else [1]) if hard else [0]
    q, options, answer = question_for(objects, target_ids, kind, rng)
    draw = ImageDraw.Draw(pil := Image.fromarray(image))
    for o in objects:
        _draw(draw, o, config.letter_stroke)
    image = np.array(pil)
    for o in objects:
        if o["stripes"]:
            _draw_stripes(image, o, config.stripe_width)
    boxes = np.array([objects[t]["box"] for t in target_ids])
    return dict(image=image, question=format_question(q, options), question_text=q, options=options,
                answer=answer, answer_letter="ABCD"[options.index(answer)], kind=kind, hard=hard,
                target_box=[float(v) for v in (*boxes[:, :2].min(0), *boxes[:, 2:].max(0))], objects=objects,
                target_ids=target_ids, data_source="vstar")
