"""DeepEyes-47k parquet files -> a prepared prompt dataset (TFDS array_record) for `--config.data.train_dir`.

  python -m launch.prepare_data --parquet='DIR/*.parquet' --out_dir=DIR [--max_prompt_tokens=8192 --tokenizer=HF_DIR]

Streams each file a batch of rows at a time (never the whole set in memory); every row is checked
(`deepeyes_jax.data.deepeyes47k`: schema, known data_source, ground truth, decodable image, decompression bomb,
aspect ratio, the expanded prompt's length with --tokenizer) and a bad row is counted by reason, logged with its
file and row index, and skipped. A row group that cannot be read skips its remaining rows (counted as
`unreadable`); a file that cannot be opened is listed in `unreadable_files`; the rest goes on. The images are stored as the encoded bytes the rows carried. The last line printed is one JSON object:
{"rows": N, "written": n, "skipped": {reason: count}, "by_source": {data_source: n}, "tiny_upscaled": k,
"unreadable_files": [...], ...}; it is also written to the dataset directory as prepare_report.json.
"""

import collections
import glob
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags, logging

from deepeyes_jax.data import deepeyes47k, prepared
from deepeyes_jax.rl.rewards import RewardConfig

flags.DEFINE_string("parquet", None, "Glob of DeepEyes-47k parquet files.", required=True)
flags.DEFINE_string("out_dir", None, "Where the prepared dataset is written.", required=True)
flags.DEFINE_integer("max_prompt_tokens", 8192, "Longest expanded prompt (image tokens included) kept "
                     "(DeepEyes: data.max_prompt_length).")
flags.DEFINE_string("tokenizer", None, "Hugging Face directory whose tokenizer counts the prompt tokens (the "
                    "model's). Without it only the image tokens are counted against --max_prompt_tokens.")
flags.DEFINE_integer("batch_rows", 64, "Rows read from a parquet file at a time.")
FLAGS = flags.FLAGS


class Counter:
    def __init__(self):
        self.rows, self.written, self.tiny, self.bad_files = 0, 0, 0, []
        self.skipped, self.by_source = collections.Counter(), collections.Counter()

    def skip(self, reason: str, n: int, where: str, message: str):
        self.rows += n
        self.skipped[reason] += n
        logging.warning("skipped (%s) %s: %s", reason, where, message)

    def summary(self) -> dict:
        return {"rows": self.rows, "written": self.written, "skipped": dict(sorted(self.skipped.items())),
                "by_source": dict(sorted(self.by_source.items())), "tiny_upscaled": self.tiny,
                "unreadable_files": self.bad_files}


def _batches(path: str, batch_rows: int, count: Counter):
    """(row index, row dict) of one file, batch by batch; an unreadable file or batch is counted, not raised."""
    try:
        f = pq.ParquetFile(path)
        columns = [c for c in deepeyes47k.COLUMNS if c in f.schema_arrow.names]
    except (OSError, pa.ArrowException, ValueError) as e:
        count.bad_files.append(path)
        logging.warning("skipped %s: not a readable parquet file (%s: %s)", path, type(e).__name__, e)
        return
    first = 0
    for group in range(f.metadata.num_row_groups):  # a damaged row group costs its own rows only
        size, done = f.metadata.row_group(group).num_rows, 0
        try:
            for batch in f.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                for row in batch.to_pylist():
                    yield first + done, row
                    done += 1
        except (OSError, pa.ArrowException, ValueError) as e:
            count.skip("unreadable", size - done, f"{path} rows {first + done}..{first + size - 1}",
                       f"unreadable data ({type(e).__name__}: {e})")
        first += size


def records(files: list[str], checks: deepeyes47k.Checks, count: Counter, batch_rows: int):
    for path in files:
        for i, row in _batches(path, batch_rows, count):
            try:
                record = deepeyes47k.convert(row, checks, position=i)
            except deepeyes47k.RowError as e:
                count.skip(e.reason, 1, f"{path} row {i}", str(e))
                continue
            count.rows += 1
            count.written += 1
            count.tiny += record.pop("tiny")
            count.by_source[record["data_source"]] += 1
            yield record


def main(argv):
    del argv
    files = sorted(glob.glob(os.path.expanduser(FLAGS.parquet)))
    if not files:
        raise app.UsageError(f"--parquet={FLAGS.parquet} matches no file")
    tokenizer = None
    if FLAGS.tokenizer:
        import transformers
        tokenizer = transformers.AutoTokenizer.from_pretrained(FLAGS.tokenizer)
    else:
        logging.warning("no --tokenizer: only image tokens are counted against --max_prompt_tokens")
    if os.path.exists(os.path.join(FLAGS.out_dir, prepared.NAME)):
        raise app.UsageError(f"--out_dir={FLAGS.out_dir} already holds a prepared dataset; choose a new directory")
    reward = RewardConfig()
    checks = deepeyes47k.Checks(sources=reward.tool_sources + reward.math_sources, tokenizer=tokenizer,
                                max_prompt_tokens=FLAGS.max_prompt_tokens)
    count = Counter()
    try:
        directory = prepared.write(FLAGS.out_dir, {"train": records(files, checks, count, FLAGS.batch_rows)})
    except AssertionError:  # TFDS refuses an empty split
        if count.written:
            raise
        directory = None
    summary = count.summary() | {"files": len(files), "dataset": directory}
    if directory is not None:
        with open(os.path.join(directory, "prepare_report.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    if directory is None:
        sys.exit("no row passed the checks: nothing written (see the warnings above)")


if __name__ == "__main__":
    app.run(main)
