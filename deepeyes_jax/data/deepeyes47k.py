"""DeepEyes-47k parquet rows -> prepared prompt records, every row checked, bad rows counted by reason.

A row (spec 5.2) carries `data_source`, `prompt` (a list of {role, content} with one `<image>`), `images` (a
list of one {bytes, path}), `reward_model.ground_truth`, `extra_info` ({split, index, answer, question}) and
`env_name`. `convert(row, checks)` returns the record `prepared.write` stores (the image stays the encoded bytes
the row carried) or raises `RowError(reason, message)`. Reasons, in the order they are checked:

    schema          a column missing or of the wrong type, a malformed prompt, not exactly one image
    unknown_source  `data_source` outside the reward's sources (it would have no reward)
    no_ground_truth `reward_model.ground_truth` missing or empty
    image           bytes that do not decode to an image (corrupt, truncated, unknown format)
    bomb            more pixels than `max_image_pixels`, refused from the header before decoding
    aspect_ratio    longer side over 200 x the shorter (qwen_vl_utils' fetch_image raises on it)
    prompt_too_long the expanded prompt (image tokens included) over `max_prompt_tokens`

A row's `env_name` (DeepEyes' `agent.tool_name_key`) decides whether it has the zoom tool: ThinkLite's rows (empty)
are non-agent, one turn without the tool (`PromptRecord.tool`). Tiny images are kept: like verl's DeepEyes recipe (qwen_vl_utils' `fetch_image`), the model's view is
smart-resized up to at least 28 px a side and 3136 pixels; they are counted as `tiny_upscaled`.
"""

from __future__ import annotations

import dataclasses

from deepeyes_jax.data import chat, image_processing
from deepeyes_jax.data.records import MAX_IMAGE_PIXELS, ImageError, decode_image

COLUMNS = ("data_source", "prompt", "images", "reward_model", "extra_info", "env_name")
REASONS = ("schema", "unknown_source", "no_ground_truth", "image", "bomb", "aspect_ratio", "prompt_too_long")


class RowError(ValueError):
    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Checks:
    """What a row must satisfy. tokenizer: counts the expanded prompt (None: only its image tokens are counted)."""

    sources: tuple[str, ...]
    tokenizer: object = None
    max_prompt_tokens: int = 8192
    min_pixels: int = image_processing.DEFAULT_MIN_PIXELS
    max_pixels: int = 16384 * 28 * 28  # fetch_image's default budget (spec 1.6)
    max_image_pixels: int = MAX_IMAGE_PIXELS


def _field(row: dict, key: str, kind, what: str | None = None):
    value = row.get(key) if isinstance(row, dict) else None
    if not isinstance(value, kind):
        raise RowError("schema", f"{what or key} is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
    return value


def _prompt(row: dict) -> chat.Messages:
    messages = _field(row, "prompt", (list, tuple))
    try:
        pairs = [(m["role"], m["content"]) for m in messages]
    except (TypeError, KeyError) as e:
        raise RowError("schema", f"prompt messages must be {{role, content}} objects ({type(e).__name__}: {e})")
    if not all(isinstance(r, str) and isinstance(c, str) for r, c in pairs):
        raise RowError("schema", "prompt roles and contents must be strings")
    try:
        return chat.check(pairs)
    except ValueError as e:
        raise RowError("schema", f"prompt: {e}") from None


def _image_bytes(row: dict) -> bytes:
    images = _field(row, "images", (list, tuple))
    if len(images) != 1:
        raise RowError("schema", f"images holds {len(images)} entries, expected 1")
    data = images[0].get("bytes") if isinstance(images[0], dict) else None
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RowError("schema", "images[0].bytes is missing or empty")
    return bytes(data)


def _image_size(data: bytes, checks: Checks) -> tuple[int, int]:
    """-> (height, width) of an image that decodes (`records.decode_image`: a bomb is refused from its header)."""
    try:
        return decode_image(data, max_pixels=checks.max_image_pixels).shape[:2]
    except ImageError as e:
        raise RowError(e.reason, str(e)) from None


def convert(row: dict, checks: Checks, *, position: int) -> dict:
    """One parquet row -> a record for `prepared.write` (plus `tiny`: the image was under 28 px a side)."""
    source = _field(row, "data_source", str)
    prompt = _prompt(row)
    data = _image_bytes(row)
    reward = _field(row, "reward_model", dict)
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    if source not in checks.sources:
        raise RowError("unknown_source", f"data_source {source!r} is not one of {checks.sources}")
    truth = reward.get("ground_truth")
    if not isinstance(truth, str) or not truth.strip():
        raise RowError("no_ground_truth", f"reward_model.ground_truth is {truth!r}")
    h, w = _image_size(data, checks)
    rh, rw = image_processing.smart_resize(h, w, min_pixels=checks.min_pixels, max_pixels=checks.max_pixels)
    image_tokens = (rh // image_processing.FACTOR) * (rw // image_processing.FACTOR)
    n = image_tokens if checks.tokenizer is None else len(
        checks.tokenizer.encode(chat.expand(prompt, image_tokens), add_special_tokens=False))
    if n > checks.max_prompt_tokens:
        raise RowError("prompt_too_long", f"expanded prompt is {n} tokens ({image_tokens} image tokens), over "
                                          f"{checks.max_prompt_tokens}")
    question = extra.get("question")
    index = extra.get("index")
    env = row.get("env_name") if isinstance(row.get("env_name"), str) else ""
    return dict(image=data, prompt=prompt, ground_truth=truth, data_source=source,
                question=question if isinstance(question, str) else prompt[-1][1], category=env,
                index=index if type(index) is int else position, tool=bool(env),
                tiny=min(h, w) < image_processing.FACTOR)
