"""V*-mini as a TFDS array_record dataset, generated offline on first use (no TensorFlow needed).

`load(data_dir, seed=, num_train=, num_test=, world=)` -> {"train": Source, "test": Source}; `src[i]` is
the dict `vstar_mini.make_scene(i, seed=seed, split=...)` returns, plus "index". Images are stored as
PNG bytes (tfds.features.Image needs TF to encode); the nested fields as one JSON string.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from deepeyes_jax.vstar_mini.world import WorldConfig, make_scene

_META = ("options", "objects", "target_ids", "data_source")  # stored together as JSON
_TEXT = ("question", "question_text", "answer", "answer_letter", "kind")


@dataclasses.dataclass(eq=False)
class VStarMiniConfig(tfds.core.BuilderConfig):
    seed: int = 0
    num_train: int = 2048
    num_test: int = 256
    world: WorldConfig = WorldConfig()

    @classmethod
    def make(cls, *, seed: int, num_train: int, num_test: int, world: WorldConfig) -> VStarMiniConfig:
        # The world goes into the name too, so changing any generation knob is a different dataset.
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(world), sort_keys=True).encode()).hexdigest()[:8]
        return cls(name=f"s{seed}_n{num_train}_{num_test}_w{digest}", seed=seed, num_train=num_train,
                   num_test=num_test, world=world, description=repr(world))


class VStarMini(tfds.core.GeneratorBasedBuilder):
    name = "vstar_mini"  # the default would be "v_star_mini"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # TFDS derives this via the `importlib_resources` backport, which is not installed; give it directly.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # keep records in index order so Source[i] is make_scene(i)
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes
                **{k: text for k in _TEXT},
                "meta": text,  # JSON of _META
                "hard": tfds.features.Scalar(dtype=np.bool_),
                "target_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # procedural: nothing to download
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train),
                "test": self._generate_examples("test", c.num_test)}

    def _generate_examples(self, split: str, num: int):
        c = self.builder_config
        for i in range(num):
            s = make_scene(i, seed=c.seed, split=split, config=c.world)
            png = io.BytesIO()
            Image.fromarray(s["image"]).save(png, format="PNG", compress_level=1)  # level 1: 3x faster, ~10% bigger
            yield i, dict(image=png.getvalue(), **{k: s[k] for k in _TEXT}, hard=s["hard"], target_box=s["target_box"],
                          meta=json.dumps({k: s[k] for k in _META}), index=i)


class Source:
    """Random access to one split: len(src), src[i] -> make_scene's dict (image uint8[H, W, 3]) + index."""

    def __init__(self, data_source):
        self._ds = data_source

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        r = self._ds[i]
        out = {k: r[k].decode() for k in _TEXT}
        out.update(json.loads(r["meta"]))
        out.update(image=np.array(Image.open(io.BytesIO(r["image"])).convert("RGB")), hard=bool(r["hard"]),
                   target_box=[float(v) for v in r["target_box"]], index=int(r["index"]))
        return out


def load(data_dir: str, *, seed: int = 0, num_train: int = 2048, num_test: int = 256,
         world: WorldConfig = WorldConfig()) -> dict[str, Source]:
    """Builds the dataset under data_dir unless already prepared there -> {"train": Source, "test": Source}."""
    config = VStarMiniConfig.make(seed=seed, num_train=num_train, num_test=num_test, world=world)
    builder = VStarMini(config=config, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),  # never look online
        )
    return {split: Source(builder.as_data_source(split=split)) for split in ("train", "test")}
