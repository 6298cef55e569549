"""Chat messages with one image -> the prompt text the model sees (Qwen2.5-VL's chat template).

A prompt is a tuple of (role, content) messages, as DeepEyes' parquet rows store them (spec 5.2):
the content holds one `<image>` placeholder where the image goes. verl's RLHFDataset splits the user
string on `<image>` and applies the Qwen2.5-VL template, which gives (spec 1.4)

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|>{pads}<|vision_end|>\\n{question}...
    <|im_end|>\\n<|im_start|>assistant\\n

`render` returns the text before and after the image block, so the caller expands the pads for the
image's own grid. A prompt without a system message gets the template's default one.
"""

from __future__ import annotations

from collections.abc import Sequence

from deepeyes_jax.data.tokenizer import SYSTEM_PROMPT, USER_PROMPT

IMAGE = "<image>"
ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM = "You are a helpful assistant."  # what the Qwen2.5-VL template inserts when none is given

Messages = tuple[tuple[str, str], ...]


def deepeyes_prompt(question: str, system_prompt: str = SYSTEM_PROMPT) -> Messages:
    """DeepEyes' training layout for V* and chart rows: `"<image>\\n" + question + USER_PROMPT_V2` (spec 1.3)."""
    return (("system", system_prompt), ("user", f"{IMAGE}\n{question}{USER_PROMPT}"))


def check(messages) -> Messages:
    """Validated messages as a tuple of (role, content); raises ValueError naming what is wrong."""
    try:
        out = tuple((str(role), str(content)) for role, content in messages)
    except (TypeError, ValueError) as e:
        raise ValueError(f"prompt must be a list of (role, content) pairs: {e}") from None
    if not out:
        raise ValueError("prompt has no messages")
    bad = [role for role, _ in out if role not in ROLES]
    if bad:
        raise ValueError(f"prompt has unknown role(s) {bad}; expected {ROLES}")
    n = sum(content.count(IMAGE) for _, content in out)
    if n != 1:
        raise ValueError(f"prompt has {n} {IMAGE} placeholders; exactly one image per prompt is supported")
    return out


def render(messages: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """(text before the image block, text after it) of the templated prompt with the assistant header."""
    messages = check(messages)
    if messages[0][0] != "system":
        messages = (("system", DEFAULT_SYSTEM),) + messages
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    before, after = (text + "<|im_start|>assistant\n").split(IMAGE)
    return before, after


def expand(messages: Sequence[tuple[str, str]], num_image_tokens: int) -> str:
    """The prompt text with the image block expanded to `num_image_tokens` pads (the model's stream)."""
    before, after = render(messages)
    return f"{before}<|vision_start|>{'<|image_pad|>' * num_image_tokens}<|vision_end|>{after}"
