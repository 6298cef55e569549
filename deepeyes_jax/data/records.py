"""One RL prompt as the trainer and the evaluator read it, whatever dataset it came from.

DeepEyes' rows (spec 5.2) carry a chat prompt with one `<image>`, the image, the ground truth, the
question the judge sees (`extra_info.question`) and a `data_source` that picks the reward (spec 3.1).
V*-mini scenes and benchmark questions are mapped to the same record, plus an optional ground-truth
box (original-image pixels; grounding IoU of zoom boxes is measured against it) and a category
(per-category evaluation).
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import PIL.Image

from deepeyes_jax.data import chat

# Decoded pixels above this are refused before decoding (a decompression bomb is a few KB of PNG that
# expands to gigabytes). 8192 x 8192 covers HR-Bench 8K (7680 x 4320) with room to spare.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_ASPECT = 200  # smart_resize refuses more (spec 1.6)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    prompt: chat.Messages  # ((role, content), ...) with one "<image>"
    image: np.ndarray  # uint8[H, W, 3]: the original image (what the zoom tool crops)
    ground_truth: str
    question: str  # what an LLM judge is shown (DeepEyes' extra_info.question)
    data_source: str  # reward dispatch: rewards.RewardConfig.tool_sources / math_sources
    box: tuple[float, float, float, float] | None = None  # ground-truth region [x1, y1, x2, y2], if known
    category: str = ""  # evaluation breakdown (V*-mini: "hard" / "easy"; benchmarks: their category)
    index: int = -1  # position in its source, for logs and renderings
    tool: bool = True  # the zoom tool is available (DeepEyes: env_name set); False: one turn, no tool (ThinkLite)


class ImageError(ValueError):
    """An image that cannot be used; `reason`: "image" (not readable), "bomb" (too many pixels) or
    "aspect_ratio"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, what: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8[H, W, 3] (alpha composited onto white, as the HF processor does).

    Raises ImageError naming `what` for anything but a readable image of at most `max_pixels` pixels and
    aspect ratio <= 200: truncated or corrupt data, an unknown format, a decompression bomb (checked from
    the header before any pixel is decoded), an empty or absurdly thin image.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ImageError("image", f"{what}: no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(bytes(data))) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError("bomb", f"{what}: {w}x{h} pixels exceed the limit of {max_pixels}")
                if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT:
                    raise ImageError("aspect_ratio", f"{what}: size {w}x{h} (aspect ratio must be <= {MAX_ASPECT})")
                im.load()
                rgb = _rgb(im)
    except ImageError:
        raise
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
        raise ImageError("bomb", f"{what}: its pixels exceed the limit (PIL: {e})") from None
    except (OSError, SyntaxError, EOFError, IndexError, TypeError, ValueError, MemoryError) as e:
        raise ImageError("image", f"{what}: not a readable image ({type(e).__name__}: {e})") from None
    return np.asarray(rgb, np.uint8)


def _rgb(im: PIL.Image.Image) -> PIL.Image.Image:
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.asarray(image, np.uint8), "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
