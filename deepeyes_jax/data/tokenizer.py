"""An offline Qwen2-style byte-level BPE tokenizer, and DeepEyes' prompt strings.

The real Qwen2.5 tokenizer cannot be downloaded here. This one has the same pipeline (NFC,
Qwen's split regex, byte-level BPE, byte-level decoder) and the same special tokens, so every
code path that depends on tokenization (tags split across tokens, special-token ids, chat
layout) is exercised; only the learned merges and the ids differ.
"""

from __future__ import annotations

import os
import random

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Spec 1.2: `PROMPT.SYSTEM_PROMPT_V2`, verbatim (two trailing spaces after "**Example**:",
# after the example's first <tool_call> and after its JSON line).
SYSTEM_PROMPT = (
    'You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user query.\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n'
    '{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an '
    'image by cropping it based on a bounding box (bbox) and an optional object label.","parameters":{"type":"object",'
    '"properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,"description":"The '
    'bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left corner and (x2, y2) is '
    'the bottom-right corner."},"label":{"type":"string","description":"The name or label of the object in the '
    'specified bounding box (optional)."}},"required":["bbox"]}}}\n</tools>\n\n# How to call a tool\nReturn a json '
    'object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n**Example**:  \n<tool_call>  \n{"name": '
    '"image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}}  \n'
    '</tool_call>'
)
# A short system prompt with the same tool and call format, for CPU-sized runs (V*-mini): the
# verbatim one is ~290 tokens of every sequence with the project tokenizer.
COMPACT_SYSTEM_PROMPT = (
    'You are a helpful assistant.\n\n# Tools\nimage_zoom_in_tool zooms in on a region of the image, given its '
    'bounding box [x1, y1, x2, y2] in pixels. Call it as:\n<tool_call>\n{"name": "image_zoom_in_tool", '
    '"arguments": {"bbox_2d": [x1, y1, x2, y2]}}\n</tool_call>'
)
# Spec 1.3: `PROMPT.USER_PROMPT_V2`, verbatim (leading newline, two spaces after each colon or
# closing tag, trailing space).
USER_PROMPT = (
    '\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  '
    '<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> '
)

# Qwen2's pre-tokenizer split (digits are single tokens), from its tokenizer.json.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
)

_WORDS = (
    "the a an of to in on at is are was be it this that with for from by as or and not what which where "
    "color red blue green yellow white black left right top bottom small large object image region person "
    "car dog cat sign text shirt table cup bottle window door tree sky building answer question option "
    "zoom crop look see find detail clearly visible located near behind front inside between count number "
    "I need to check closer first then so can cannot because there here wearing holding standing sitting"
).split()


def default_corpus() -> list[str]:
    """Deterministic training text: the DeepEyes prompts, tool calls, think/answer turns, prose."""
    rng = random.Random(0)
    lines = [SYSTEM_PROMPT, USER_PROMPT] * 4
    for i in range(400):
        box = [rng.randrange(0, 2000) for _ in range(4)]
        if i % 3 == 0:
            box = [round(v + rng.random(), 1) for v in box]
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(6, 30)))
        label = " ".join(rng.choice(_WORDS) for _ in range(3))
        call = f'{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}, "label": "{label}"}}}}'
        lines.append(f"<think>{words.capitalize()}.</think>\n<tool_call>\n{call}\n</tool_call>")
        lines.append(f"<think>{words}</think>  <answer>{rng.choice('ABCD')}. {label}</answer>")
        lines.append(f"Question: What is the {label}?\nOptions: \nA. {rng.choice(_WORDS)}\nB. {i}\n")
    return lines


def _train(vocab_size: int, corpus: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # All 256 byte symbols are in the alphabet, so any text encodes (no unknown token).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tokenizer(directory: str | os.PathLike | None = None, *, vocab_size: int = 1024,
                    corpus: list[str] | None = None) -> transformers.PreTrainedTokenizerFast:
    """Train (deterministically, offline) and return a Qwen2TokenizerFast.

    vocab_size counts the learned byte-level vocabulary (>= 256); the 16 Qwen special tokens
    follow it, in SPECIAL_TOKENS order. If `directory` is given the tokenizer is saved there
    and `transformers.AutoTokenizer.from_pretrained(directory)` reloads it offline.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    backend = _train(vocab_size, default_corpus() if corpus is None else list(corpus))
    # Added after training, in Qwen's order, so their ids follow the learned vocabulary.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = transformers.Qwen2TokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, clean_up_tokenization_spaces=False,
        errors="replace", split_special_tokens=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    if directory is not None:
        tokenizer.save_pretrained(os.fspath(directory))
    return tokenizer
