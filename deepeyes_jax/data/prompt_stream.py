"""Training batches of prompt groups from an indexed example source, with a resumable position.

A record that cannot be made into a prompt of the static shapes (image too large, prompt too long,
unknown data source) is counted, logged and skipped: a run never dies on one corrupt record.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from absl import logging

from deepeyes_jax.data.tokenizer import SYSTEM_PROMPT
from deepeyes_jax.rl.rewards import RewardConfig
from deepeyes_jax.rl.train_step import TrainBatch
from deepeyes_jax.rollout.inputs import RolloutBatch, make_batch


class PromptStream:
    """next_batch() -> (TrainBatch of prompts * group_size rows, the source's record of each row); state() -> dict.

    source(index) -> dict(image, question, answer, data_source, ...).
    """

    def __init__(self, source: Callable[[int], dict], *, tokenizer, prompts: int, group_size: int,
                 prompt_len: int, num_patches: int, image_hw: tuple[int, int], max_pixels: int,
                 answer_bytes: int = 64, reward: RewardConfig = RewardConfig(), state: dict | None = None,
                 system_prompt: str = SYSTEM_PROMPT):
        self.source, self.tokenizer, self.reward = source, tokenizer, reward
        self.prompts, self.group_size, self.answer_bytes = prompts, group_size, answer_bytes
        self.shapes = dict(prompt_len=prompt_len, num_patches=num_patches, image_hw=tuple(image_hw),
                           max_pixels=max_pixels, system_prompt=system_prompt)
        state = state or {}
        self.index, self.skipped = int(state.get("index", 0)), int(state.get("skipped", 0))

    def state(self) -> dict:
        return {"index": self.index, "skipped": self.skipped}

    def _checked(self, index: int) -> dict:
        ex = self.source(index)
        kind = self.reward.source_kind(ex["data_source"])
        answer = str(ex["answer"]).encode()
        if len(answer) > self.answer_bytes:
            raise ValueError(f"answer of {len(answer)} bytes exceeds {self.answer_bytes}")
        row = make_batch(self.tokenizer, [ex["question"]], [ex["image"]], **self.shapes)  # raises if it does not fit
        return dict(ex, source_kind=kind, answer_utf8=answer, rollout=row)

    def next_batch(self):
        examples = []
        while len(examples) < self.prompts:
            index, self.index = self.index, self.index + 1
            try:
                examples.append(self._checked(index))
            except (ValueError, KeyError, TypeError) as e:
                self.skipped += 1
                logging.warning("skipping record %d (%d skipped so far): %s", index, self.skipped, e)
        rows = [ex for ex in examples for _ in range(self.group_size)]
        rollout = RolloutBatch(*(np.repeat(np.concatenate(f), self.group_size, axis=0)
                                 for f in zip(*(ex["rollout"] for ex in examples))))
        answer = np.zeros((len(rows), self.answer_bytes), np.uint8)
        for i, ex in enumerate(rows):
            answer[i, :len(ex["answer_utf8"])] = np.frombuffer(ex["answer_utf8"], np.uint8)
        batch = TrainBatch(rollout, answer, np.array([len(ex["answer_utf8"]) for ex in rows], np.int32),
                           np.array([ex["source_kind"] for ex in rows], np.int32))
        return batch, rows
