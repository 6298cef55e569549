"""Host-side Qwen2.5-VL image preprocessing (numpy + PIL only).

Bit-for-bit equal to transformers 5.23 `Qwen2VLImageProcessorPil` with default settings:
RGB conversion (alpha composited onto white) -> smart_resize -> PIL bicubic on uint8 ->
x * (1/255) in float64, cast to float32 -> (x - mean) / std in float32 -> patchify.
"""

import math

import numpy as np
import PIL.Image

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # resized sides are multiples of this (28)
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176
PATCH_VALUES = 3 * PATCH_SIZE * PATCH_SIZE  # 588: one frame of a patch as uint8 (a still image's T copies are equal)
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)  # OpenAI CLIP
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# The processor's class defaults in transformers 5.23 (size shortest_edge / longest_edge). The
# released Qwen2.5-VL preprocessor_config.json raises max_pixels to 12845056; pass it explicitly.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def smart_resize(height, width, *, factor=FACTOR, min_pixels=DEFAULT_MIN_PIXELS,
                 max_pixels=DEFAULT_MAX_PIXELS):
    """(height, width) -> (h, w), both multiples of `factor`, min_pixels <= h*w <= max_pixels when
    possible, aspect ratio roughly kept. Expressions copied from HF so float rounding agrees."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels=}, {max_pixels=}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be <= 200, got height={height}, width={width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patch_frames(image_chw):
    """[3, H, W] (H, W multiples of 28) -> [H/14 * W/14, 588], any dtype: one frame per patch.

    Rows go in 2x2 merge-window order (window row, window col, row in window, col in window) so
    the vision merger can fold 4 consecutive rows; each row flattens (C, 14, 14)."""
    c, h, w = image_chw.shape
    if c != 3 or h % FACTOR or w % FACTOR or h == 0 or w == 0:
        raise ValueError(
            f"image_chw must be [3, H, W], H and W multiples of {FACTOR}, got {image_chw.shape}")
    gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
    x = np.asarray(image_chw).reshape(
        3, gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE)
    return x.transpose(1, 4, 2, 5, 0, 3, 6).reshape(gh * gw, PATCH_VALUES)


def patchify(image_chw):
    """float32[3, H, W] (H, W multiples of 28) -> float32[H/14 * W/14, 1176]: `patch_frames` with each row
    flattened (C, T=2, 14, 14), the still image repeated along T."""
    x = patch_frames(np.asarray(image_chw, np.float32)).reshape(-1, 3, 1, PATCH_SIZE * PATCH_SIZE)
    return np.broadcast_to(x, (x.shape[0], 3, TEMPORAL_PATCH_SIZE, PATCH_SIZE * PATCH_SIZE)).reshape(-1, PATCH_DIM)


def pixel_values_from_frames(frames):
    """uint8[..., 588] patch frames -> the processor's float32[..., 1176]: x * (1/255) in float64, cast to
    float32, (x - mean) / std in float32, repeated along T (bit-for-bit the processor's values)."""
    frames = np.asarray(frames)
    x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32).reshape(*frames.shape[:-1], 3, 1, -1)
    x = (x - IMAGE_MEAN[:, None, None]) / IMAGE_STD[:, None, None]
    return np.broadcast_to(x, (*x.shape[:-2], TEMPORAL_PATCH_SIZE, x.shape[-1])).reshape(*frames.shape[:-1],
                                                                                         PATCH_DIM)


def image_from_frames(frames, grid_thw) -> np.ndarray:
    """Inverse of `patch_frames` for a still image: uint8[h*w, 588] (at least), grid (1, h, w) -> uint8[14h, 14w, 3]."""
    t, gh, gw = (int(v) for v in grid_thw)
    if t != 1 or gh % MERGE_SIZE or gw % MERGE_SIZE or len(frames) < gh * gw:  # (padded slots are longer)
        raise ValueError(f"frames {np.shape(frames)} do not match grid_thw {tuple(grid_thw)}")
    x = np.asarray(frames)[:gh * gw].reshape(gh // MERGE_SIZE, gw // MERGE_SIZE, MERGE_SIZE, MERGE_SIZE, 3,
                                            PATCH_SIZE, PATCH_SIZE)
    return x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * PATCH_SIZE, gw * PATCH_SIZE, 3)


def _to_rgb_pil(image):
    """PIL.Image (any mode) or uint8[H, W, 3] -> RGB PIL.Image, validating the input."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(
                f"image array must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
        return PIL.Image.fromarray(image, "RGB")
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"image must be a PIL.Image or numpy array, got {type(image).__name__}")
    if 0 in image.size:
        raise ValueError(f"image is empty: PIL size (w, h)={image.size}, mode={image.mode}")
    # HF composites transparency onto white instead of dropping alpha; match it.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image, *, min_pixels=None, max_pixels=None):
    """PIL.Image or uint8[H, W, 3] -> (pixel_values float32[N, 1176], grid_thw int64[3]),
    N = grid_thw.prod(). None means the DEFAULT_* pixel bounds."""
    frames, grid_thw = preprocess_frames(image, min_pixels=min_pixels, max_pixels=max_pixels)
    return pixel_values_from_frames(frames), grid_thw


def preprocess_frames(image, *, min_pixels=None, max_pixels=None):
    """Like `preprocess_image`, stopping before the normalisation: (uint8[N, 588] patch frames, grid_thw)."""
    rgb = _to_rgb_pil(image)
    h, w = smart_resize(rgb.height, rgb.width,
                        min_pixels=DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels,
                        max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    # Resampling must happen on uint8 (HF converts to uint8 PIL before resizing).
    x = np.asarray(rgb.resize((w, h), resample=PIL.Image.BICUBIC))
    grid_thw = np.array([1, h // PATCH_SIZE, w // PATCH_SIZE], dtype=np.int64)
    return patch_frames(x.transpose(2, 0, 1)), grid_thw


def preprocess_images(images, **kw):
    """Sequence of n images -> (pixel_values float32[sum N_i, 1176], image_grid_thw int64[n, 3]),
    rows concatenated in input order like the HF processor called on a list."""
    if len(images) == 0:
        raise ValueError("images is empty")
    outs = [preprocess_image(im, **kw) for im in images]
    return np.concatenate([p for p, _ in outs]), np.stack([g for _, g in outs])


def num_image_tokens(grid_thw):
    """LLM placeholder tokens for one image: t*h*w patches merged 2x2 into one token each."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (MERGE_SIZE * MERGE_SIZE)
