"""Batches of prompt groups for the train step, each host building only its own rows.

    batches = PromptBatches(source, tokenizer=..., data=DataConfig(...), crop=..., prompts=256, group_size=16,
                            mesh=mesh, rules=rules)
    batch, records = batches.next()     # TrainBatch of global arrays (rows sharded); this host's records

The order is global and fixed by the seed: a grain `MapDataset` over the source's indices, shuffled anew
each epoch. Global batch k holds prompt positions [k * prompts, (k + 1) * prompts), each repeated
`group_size` times in consecutive rows. A host reads only the records of the rows its devices hold
(`sharding.process_rows`) and the global batch is assembled from the hosts' parts
(`jax.make_array_from_process_local_data`), so no host ever holds the whole batch.

A record that cannot become a prompt of the static shapes (unreadable image, prompt too long, unknown
data_source, answer too long) is logged, counted and replaced by the next readable position of the same
batch (cyclically). The replacement is a function of the global positions alone, so every host count
builds the same batch, and the position to resume from is just the number of prompts consumed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging

from deepeyes_jax import sharding as shd
from deepeyes_jax.data import image_processing
from deepeyes_jax.data.records import MAX_IMAGE_PIXELS, PromptRecord
from deepeyes_jax.rl.rewards import RewardConfig
from deepeyes_jax.rl.train_step import TrainBatch
from deepeyes_jax.rollout.inputs import RolloutBatch, make_batch
from deepeyes_jax.rollout.zoom import CropSpec


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training prompts come from and the static shapes they are padded to.

    train_dir: a prepared prompt dataset (`data.prepared`; `launch.prepare_data` writes one).
    seed: the shuffling seed (DeepEyes: a RandomSampler seeded 1, reshuffled every epoch).
    prompt_len: prompt tokens, image tokens included (DeepEyes: data.max_prompt_length 8192).
    num_patches: the prompt image's patch buffer (4 patches per image token).
    min_pixels / max_pixels: the prompt image's smart_resize budget (DeepEyes: fetch_image's 3136 / 12845056).
    answer_bytes: the ground truth's UTF-8 buffer; a longer one skips the record.
    max_image_pixels: a record whose image has more pixels is refused before decoding.
    The original image is kept in the rollout's crop buffer (`rollout.crop.image_height/width`).
    """

    train_dir: str = ""
    train_split: str = "train"
    seed: int = 1
    prompt_len: int = 8192
    num_patches: int = 32768
    min_pixels: int = image_processing.DEFAULT_MIN_PIXELS
    max_pixels: int = 16384 * 28 * 28
    answer_bytes: int = 256
    max_image_pixels: int = MAX_IMAGE_PIXELS


class PromptBatches:
    """Global TrainBatches of `prompts` prompt groups from a random-access source of `PromptRecord`s.

    shuffle/repeat: the training order (a seeded epoch permutation, forever); without them the source is
    read once in order and the last batch is padded with repeats of its last prompt (`padded` rows).
    first_turn(record) -> token ids forced as the start of the record's first turn, or None (data selection's
    ground-truth zoom), padded to `first_turn_len`; training forces nothing.
    """

    def __init__(self, source, *, tokenizer, data: DataConfig, crop: CropSpec, prompts: int, group_size: int,
                 mesh, rules, reward: RewardConfig = RewardConfig(), shuffle: bool = True, position: int = 0,
                 first_turn=None, first_turn_len: int = 0):
        if len(source) == 0:
            raise ValueError("the prompt source is empty")
        self.source, self.tokenizer, self.data, self.reward = source, tokenizer, data, reward
        self.prompts, self.group_size, self.mesh, self.rules = prompts, group_size, mesh, rules
        self.image_hw = (crop.image_height, crop.image_width)
        self.shuffle, self.position, self.skipped = shuffle, int(position), 0
        self.first_turn, self.first_turn_len = first_turn, first_turn_len
        order = grain.MapDataset.source(range(len(source)))
        self._order = order.shuffle(seed=data.seed).repeat() if shuffle else order

    # ---------------------------------------------------------------- state

    def state(self) -> dict:
        """JSON-able position to resume from (prompts consumed); host-count independent."""
        return {"position": self.position}

    @property
    def num_batches(self) -> int:
        """Batches in one pass over the source (the last one padded)."""
        return -(-len(self.source) // self.prompts)

    # ---------------------------------------------------------------- one record

    def _row(self, record: PromptRecord) -> dict:
        answer = str(record.ground_truth).encode()
        if len(answer) > self.data.answer_bytes:
            raise ValueError(f"ground truth of {len(answer)} bytes exceeds data.answer_bytes={self.data.answer_bytes}")
        kind = self.reward.source_kind(record.data_source)
        d = self.data
        rollout = make_batch(self.tokenizer, [record.prompt], [record.image], prompt_len=d.prompt_len,
                             num_patches=d.num_patches, image_hw=self.image_hw, min_pixels=d.min_pixels,
                             max_pixels=d.max_pixels, first_turn_len=self.first_turn_len,
                             first_turns=[self.first_turn(record)] if self.first_turn else None,
                             tools=[record.tool])
        return dict(record=record, rollout=rollout, answer=answer, kind=kind)

    def _read(self, position: int) -> dict:
        """The prompt at a global position (training order); raises ValueError if it cannot be used."""
        if not self.shuffle and position >= len(self.source):
            position = len(self.source) - 1  # padding of the last evaluation batch
        index = int(self._order[position])
        try:
            return self._row(self.source[index]) | {"index": index}
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ValueError(f"record {index} (position {position}): {e}") from None

    def _usable(self, start: int, slot: int) -> dict:
        """Slot `slot` of the batch starting at `start`, replaced by the next usable slot if it is not."""
        for k in range(self.prompts):
            pos = start + (slot + k) % self.prompts
            try:
                row = self._read(pos)
            except ValueError as e:
                self.skipped += 1
                logging.warning("skipping a prompt (%d skipped so far): %s", self.skipped, e)
                continue
            return row | {"substitute": k > 0}
        raise ValueError(f"no usable prompt among positions {start}..{start + self.prompts - 1}; see the "
                         f"warnings above (shapes too small for the data?)")

    # ---------------------------------------------------------------- one batch

    def next(self) -> tuple[TrainBatch, list[dict]]:
        """-> (global TrainBatch, this host's rows: dicts with record, index, padded, substitute)."""
        b = self.prompts * self.group_size
        lo, hi = shd.process_rows(shd.row_sharding(self.mesh, self.rules, (b,)), (b,))
        first, last = lo // self.group_size, -(-hi // self.group_size)
        start = self.position
        slots = {s: self._usable(start, s) for s in range(first, last)}
        local = [dict(slots[r // self.group_size], padded=not self.shuffle and start + r // self.group_size
                      >= len(self.source)) for r in range(lo, hi)]
        self.position += self.prompts
        return shd.global_batch(self._host_batch(local), self.mesh, self.rules, b), local

    def _host_batch(self, rows: Sequence[dict]) -> TrainBatch:
        answer = np.zeros((len(rows), self.data.answer_bytes), np.uint8)
        for i, r in enumerate(rows):
            answer[i, :len(r["answer"])] = np.frombuffer(r["answer"], np.uint8)
        boxes = [r["record"].box for r in rows]
        return TrainBatch(
            rollout=RolloutBatch(*(np.concatenate(f) for f in zip(*(r["rollout"] for r in rows)))),
            answer=answer, answer_len=np.array([len(r["answer"]) for r in rows], np.int32),
            source_kind=np.array([r["kind"] for r in rows], np.int32),
            box=np.array([b if b is not None else (0, 0, 0, 0) for b in boxes], np.float32),
            has_box=np.array([b is not None for b in boxes]))
