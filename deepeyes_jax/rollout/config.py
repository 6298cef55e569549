"""Static configuration of the compiled rollout, and the observation token templates."""

from __future__ import annotations

import dataclasses

from deepeyes_jax.rollout.tools import ERROR_MESSAGES, ToolConfig
from deepeyes_jax.rollout.zoom import CropSpec

# END_SINGLE_TURN: a row without the tool (DeepEyes' non-agent rows, e.g. ThinkLite) ends after its one turn.
END_ANSWER, END_NO_TOOL_CALL, END_TURN_BUDGET, END_MAX_TURNS, END_LENGTH, END_SINGLE_TURN = range(6)
END_NAMES = {END_ANSWER: "answer", END_NO_TOOL_CALL: "no_tool_call", END_TURN_BUDGET: "turn_budget",
             END_MAX_TURNS: "max_turns", END_LENGTH: "length", END_SINGLE_TURN: "single_turn"}


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Shapes and sampling of `rollout`; all static (a change recompiles).

    max_total_len: slots per trajectory (prompt + turns + observations), DeepEyes 28672.
    max_turns: generation calls per trajectory (DeepEyes 7B: 5); the last never gets an observation.
    max_turn_tokens: per-turn budget (DeepEyes 10240); a turn that hits it ends the trajectory.
    bbox_frame: "original" (DeepEyes: the box is applied unchanged to the original image) or
      "resized" (the box is read in the model's resized input frame and mapped back, spec issue #141).
    temperature 0 means greedy; top_k <= 0 and top_p >= 1 disable those filters.
    row_chunks: the batch is rolled out in this many chunks of rows, one after the other inside the program
      (each chunk spread over every device): the KV cache and the per-turn crop work are those of one chunk.
      Chunk c samples with its own key (rng folded with c); 1 rolls every row out at once.
    """

    max_total_len: int
    crop: CropSpec
    max_turns: int = 5
    max_turn_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    bbox_frame: str = "original"
    tool: ToolConfig = ToolConfig()
    row_chunks: int = 1

    def __post_init__(self):
        if self.row_chunks < 1:
            raise ValueError(f"row_chunks must be >= 1, got {self.row_chunks}")
        if self.bbox_frame not in ("original", "resized"):
            raise ValueError(f"bbox_frame must be 'original' or 'resized', got {self.bbox_frame!r}")
        if self.max_turns < 1 or self.max_turn_tokens < 1:
            raise ValueError(f"max_turns {self.max_turns} and max_turn_tokens {self.max_turn_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Templates:
    """Token ids of the observation turns DeepEyes appends (spec 1.4), as hashable tuples.

    A zoom observation is zoom_prefix + [image_pad] * n + zoom_suffix; an error observation is
    errors[kind]. All start after the assistant's <|im_end|> and end with the next assistant header.
    """

    zoom_prefix: tuple[int, ...]
    zoom_suffix: tuple[int, ...]
    errors: tuple[tuple[int, ...], ...]  # indexed by error kind
    im_end: int
    image_pad: int


def make_templates(tokenizer) -> Templates:
    from deepeyes_jax.data.tokenizer import USER_PROMPT

    def ids(text):
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    kinds = range(max(ERROR_MESSAGES) + 1)
    return Templates(
        zoom_prefix=ids("\n<|im_start|>user\n<tool_response><|vision_start|>"),
        zoom_suffix=ids("<|vision_end|>" + USER_PROMPT + "</tool_response><|im_end|>\n<|im_start|>assistant\n"),
        errors=tuple(ids(f"\n<|im_start|>user\nError: {ERROR_MESSAGES.get(k, '')}<|im_end|>\n<|im_start|>assistant\n")
                     for k in kinds),
        im_end=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        image_pad=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
    )
