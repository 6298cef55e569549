"""Run Qwen2.5-VL on a generated example (the main job until the training launcher lands).

  python -m launch.run_model                                      # tiny, random weights
  python -m launch.run_model --config=configs/qwen2_5_vl.py:100m
  python -m launch.run_model --config.checkpoint=/ckpts/Qwen2.5-VL-7B-Instruct --config.mesh=-1,1,4
"""

import ml_collections

from deepeyes_jax.sharding import DEFAULT_AXIS_RULES


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = arg  # preset for random weights when no checkpoint is given
    c.checkpoint = ""  # a Hugging Face Qwen2.5-VL directory; empty = random `model` preset
    c.seed = 0
    c.param_dtype = "float32"
    c.compute_dtype = "float32"  # "bfloat16" on TPU

    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    c.axis_rules = DEFAULT_AXIS_RULES

    c.example = ml_collections.ConfigDict()
    c.example.batch = 2
    c.example.image_height = 300
    c.example.image_width = 420
    c.example.max_pixels = 28 * 28 * 256  # processor budget for the generated image
    c.example.text_tokens = 24
    return c
