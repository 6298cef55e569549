"""V*-mini: GRPO with the zoom tool on procedural V*-style scenes, from a tiny supervised base model.

  python -m launch.train                                   # this config, workdir runs/vstar_mini
  python -m launch.train --config=configs/vstar_mini.py --workdir=runs/x --config.reward.tool_weight=0
  python -m launch.eval --config=configs/vstar_mini.py --checkpoint=runs/vstar_mini/export [--config.eval.seed=7]

The scene is shown under `data.scene_max_pixels` (448 px -> 112 px: a small target is ~7 px, below
one 14 px patch), a zoomed crop under `rollout.crop_*_pixels` (a 56-112 px box on the `sft.box_grid`
-> 112 px: the target spans 2-4 patches). `arg` "smoke" shrinks everything for a quick plumbing run (tests use it).
"""

import ml_collections

from deepeyes_jax.sharding import DEFAULT_AXIS_RULES


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 60  # GRPO steps
    c.prompts = 4  # prompts per step (x group_size rows)
    c.distributed = False  # jax.distributed.initialize() for multi-host pods
    c.mesh = (-1, 1, 1)
    c.axis_rules = DEFAULT_AXIS_RULES
    c.system_prompt = "compact"  # or "deepeyes" (verbatim SYSTEM_PROMPT_V2, ~290 tokens)

    c.data = ml_collections.ConfigDict(dict(
        data_dir="~/.cache/deepeyes_jax/tfds", seed=0, num_train=2048, num_test=256, image_size=448,
        hard_fraction=0.75, scene_max_pixels=112 * 112, prompt_len=192, num_patches=64,
        # The question kinds asked (see data/vstar_mini.py); colour ones are what a model this small learns
        # to see within the supervised budget (shapes and letters stay at chance after 250 steps).
        kinds=("letter_colour", "large_colour"), letter_stroke=0.25, position_tint=0, small_size=(24, 32),
        num_small=(4, 6)))
    c.tokenizer_vocab = 1024
    c.model = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        mrope_section=(4, 6, 6), vision_depth=2, vision_hidden_size=128, vision_heads=4))
    c.compute_dtype = "float32"
    c.remat = False

    c.base_model_dir = ""  # default: WORKDIR/base_model (trained on first use, then reused)
    c.sft = ml_collections.ConfigDict(dict(
        steps=200, batch=32, learning_rate=2e-3, warmup=20, seq_len=352, tool_prior=0.25, box_grid=56,
        task_weights=ml_collections.ConfigDict(dict(scene=2.0, easy=1.0, closeup=1.0, second=1.0, observed=2.0,
                                                    grounding=1.0, tool_call=1.0))))

    c.rollout = ml_collections.ConfigDict(dict(max_total_len=576, max_turns=3, max_turn_tokens=80,
                                               temperature=1.0, crop_min_pixels=112 * 112,
                                               crop_max_pixels=112 * 112))
    c.grpo = ml_collections.ConfigDict(dict(group_size=8, clip_ratio_low=0.2, clip_ratio_high=0.28, kl_coef=0.0,
                                            entropy_coef=0.0, loss_agg_mode="token-mean"))
    c.reward = ml_collections.ConfigDict(dict(acc_weight=0.8, format_weight=0.2, tool_weight=1.2))
    c.optim = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=5, weight_decay=0.0,
                                             max_grad_norm=1.0))
    c.mini_batches = 1
    c.micro_batches = 1
    c.logprob_chunk = 256

    c.eval = ml_collections.ConfigDict(dict(
        every=20, examples=128, final_examples=256, batch=64, render=4, probe_examples=64,
        seed=-1))  # seed >= 0: evaluate on a freshly generated test split with this seed
    c.checkpoint = ml_collections.ConfigDict(dict(save_every=20, keep=2))
    c.export_hf = True

    if arg == "smoke":
        c.steps, c.prompts = 2, 2
        c.data.num_train, c.data.num_test = 32, 16
        c.model.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, mrope_section=(2, 3, 3), vision_depth=2, vision_hidden_size=32,
                       vision_heads=2)
        c.sft.update(steps=4, batch=8)
        c.grpo.group_size = 4
        c.eval.update(every=1, examples=8, final_examples=8, batch=8, render=2, probe_examples=4)
        c.checkpoint.save_every = 1
    return c
