"""GRPO with the on-device zoom tool on built-in procedural colour scenes, from a random tiny model.

  python -m launch.train --config=configs/grpo_toy.py --workdir=runs/toy [--config.steps=20]

A plumbing run (a random model gets no reward to learn from); V*-mini replaces the data and adds
the base model.
"""

import ml_collections

from deepeyes_jax.sharding import DEFAULT_AXIS_RULES


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 8
    c.distributed = False  # jax.distributed.initialize() for multi-host pods
    c.mesh = (-1, 1, 1)
    c.axis_rules = DEFAULT_AXIS_RULES

    c.tokenizer_vocab = 1024
    c.model = ml_collections.ConfigDict(dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        mrope_section=(2, 3, 3), vision_depth=2, vision_hidden_size=32, vision_heads=2))
    c.compute_dtype = "float32"
    c.remat = False

    c.data = ml_collections.ConfigDict(dict(prompts=2, image_height=112, image_width=112, prompt_len=448,
                                            num_patches=64, max_pixels=112 * 112))
    c.rollout = ml_collections.ConfigDict(dict(max_total_len=640, max_turns=3, max_turn_tokens=32,
                                               temperature=1.0, crop_min_pixels=56 * 56, crop_max_pixels=56 * 56))
    c.grpo = ml_collections.ConfigDict(dict(group_size=4, clip_ratio_low=0.2, clip_ratio_high=0.2, kl_coef=0.0,
                                            entropy_coef=0.0, loss_agg_mode="token-mean"))
    c.reward = ml_collections.ConfigDict(dict(acc_weight=0.8, format_weight=0.2, tool_weight=1.2))
    c.optim = ml_collections.ConfigDict(dict(learning_rate=1e-5, warmup_steps=2, weight_decay=0.0,
                                             max_grad_norm=1.0))
    c.mini_batches = 1
    c.micro_batches = 1
    c.logprob_chunk = 256

    c.checkpoint = ml_collections.ConfigDict(dict(save_every=2, keep=3))
    c.export_hf = True
    return c
