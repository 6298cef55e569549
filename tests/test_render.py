"""Trajectory rendering: layout, box and crop pixels where expected, PNG round trip."""

import numpy as np
import pytest
from PIL import Image

from deepeyes_jax.eval import render
from deepeyes_jax.eval.render import render_trajectory, save_grid

MAGENTA = (255, 0, 255)  # crop colour; absent from the synthetic image
ZOOM_BOX = [100, 60, 300, 260]
GT_BOX = [20, 320, 180, 420]


def _image():
    """448x448 blue/grey gradient: none of the box, error or crop colours occur in it."""
    ramp = np.linspace(40, 200, 448, dtype=np.float32)
    img = np.empty((448, 448, 3), np.uint8)
    img[..., 0] = ramp[None, :] * 0.5
    img[..., 1] = ramp[:, None] * 0.5
    img[..., 2] = 220
    return img


def _turns(n=2):
    turns = [
        {"text": "The sign is small. " * 30 + '<tool_call>{"name": "image_zoom_in_tool", '
                 '"arguments": {"bbox_2d": [100, 60, 300, 260]}}</tool_call>',
         "bbox": ZOOM_BOX, "crop": np.full((40, 40, 3), MAGENTA, np.uint8), "error": None},
        {"text": "<answer>STOP</answer>", "bbox": None, "crop": None, "error": None},
    ]
    extra = {"text": "Let me look again.\nSecond paragraph.", "bbox": None, "crop": None,
             "error": "invalid bbox: x2 <= x1"}
    return turns + [extra] * (n - 2)


def _render(turns=None, **kwargs):
    kwargs = {"gt_box": GT_BOX, "answer": "STOP", "correct": True, **kwargs}
    return render_trajectory(_image(), "What does the sign say?\nAnswer in one word.",
                             _turns() if turns is None else turns, **kwargs)


def _px(img, x, y):
    return tuple(int(v) for v in np.asarray(img)[y, x])


def _panel_xy(x, y):
    """Original-image pixel -> canvas pixel in the left panel (448 -> LEFT_W, at PAD, PAD)."""
    scale = render.LEFT_W / 448
    return render.PAD + round(x * scale), render.PAD + round(y * scale)


def test_rgb_requested_width_and_height_grows():
    two = _render()
    assert two.mode == "RGB"
    assert two.width == 900
    assert _render(width=1100).width == 1100
    assert _render(_turns(3)).height > two.height


def test_zoom_and_gt_boxes_on_scaled_edges():
    img = _render()
    for box, colour in ((ZOOM_BOX, render.ZOOM_COLOUR), (GT_BOX, render.GT_COLOUR)):
        x1, y1 = _panel_xy(box[0], box[1])
        x2, y2 = _panel_xy(box[2], box[3])
        mid_x, mid_y = (x1 + x2) // 2, (y1 + y2) // 2
        # Each edge: the 3 px line lies just inside the scaled box, never beyond it.
        assert _px(img, x1 + 1, mid_y) == colour
        assert _px(img, x2 - 2, mid_y) == colour
        assert _px(img, mid_x, y1 + 1) == colour
        assert _px(img, mid_x, y2 - 2) == colour
        assert _px(img, x1 + 5, mid_y) != colour  # outline, not filled
        assert _px(img, x1 - 2, mid_y) != colour


def test_crop_thumbnail_is_a_nearest_upscaled_block_in_right_column():
    arr = np.asarray(_render())
    ys, xs = np.nonzero((arr == MAGENTA).all(-1))
    assert len(ys), "crop thumbnail missing"
    y0, x0 = ys.min(), xs.min()
    assert x0 >= render.PAD + render.LEFT_W  # right column, not over the image
    assert (arr[y0:y0 + 150, x0:x0 + 150] == MAGENTA).all()
    assert ys.max() - y0 + 1 == render.THUMB and xs.max() - x0 + 1 == render.THUMB


def test_error_turn_without_crop_renders_in_red():
    turns = [{"text": "zoom", "bbox": None, "crop": None, "error": "bbox out of image"}]
    arr = np.asarray(_render(turns, correct=None))
    right = arr[:, render.PAD + render.LEFT_W:]
    assert not (right == MAGENTA).all(-1).any()
    assert (right == render.ERROR_COLOUR).all(-1).any()


@pytest.mark.parametrize("correct, colour", [(True, render.CORRECT_COLOUR),
                                             (False, render.ERROR_COLOUR)])
def test_footer_colour_codes_the_verdict(correct, colour):
    arr = np.asarray(_render(_turns()[1:], correct=correct))  # no crop, no error: only footer
    footer = arr[-3 * render.LINE_H:]
    assert (footer == colour).all(-1).any()


def test_long_unbroken_text_wraps_within_width():
    turns = [{"text": "x" * 2000, "bbox": None, "crop": None, "error": None}]
    img = _render(turns)
    assert img.width == 900
    assert img.height > 2000 // 100 * render.LINE_H  # many lines, not one clipped line


def test_save_grid_png_round_trip(tmp_path):
    one = _render()
    path = tmp_path / "one.png"
    save_grid([one], str(path))
    with Image.open(path) as reopened:
        assert reopened.format == "PNG" and reopened.size == one.size

    three = [one, _render(_turns(3)), _render(width=700)]
    save_grid(three, str(tmp_path / "grid.png"), columns=2)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (900 + render.PAD + 900,
                             three[1].height + render.PAD + three[2].height)
