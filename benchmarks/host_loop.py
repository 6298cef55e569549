"""DeepEyes' agent loop on the host with transformers (the reference side of `benchmarks.rollout` and
`benchmarks.eval`): per turn generate, decode, parse the tool call with DeepEyes' rules, crop the original image
with PIL, preprocess with the Hugging Face image processor and re-prefill the whole context."""

import os
import time

import numpy as np

from deepeyes_jax.testing import scripted


def hf_model(path):
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    return model


def hf_generate(model, ids, mask, pixels, grids, image_token_id, **kw):
    import torch
    with torch.no_grad():
        return model.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(pixels), image_grid_thw=torch.from_numpy(grids),
            mm_token_type_ids=torch.from_numpy((ids == image_token_id).astype(np.int64)), pad_token_id=0, **kw,
        ).numpy()[:, ids.shape[1]:]


def hf_zoom(setup, path, batch, originals=None):
    """DeepEyes' agent loop on the host: per turn generate, decode, json-parse, PIL crop, re-prefill.

    path: the HF model directory or a loaded model; originals: each row's original image (default: the scripted
    image of script row r % 3, as `Setup.make_batch` lays rows out). -> (seconds, sampled tokens, zooms)."""
    import PIL.Image
    from transformers import Qwen2VLImageProcessorPil

    from deepeyes_jax.rollout import tools
    from deepeyes_jax.testing.deepeyes_parse import reference
    model = hf_model(path) if isinstance(path, str) else path
    processor = Qwen2VLImageProcessorPil(min_pixels=scripted.CROP_MIN, max_pixels=scripted.CROP_MAX)
    tok, tpl, cfg = setup.tokenizer, setup.templates, setup.config
    b = len(batch.prompt_ids)
    t = time.perf_counter()
    seqs = [batch.prompt_ids[r][batch.prompt_mask[r].astype(bool)].tolist() for r in range(b)]
    images = [[batch.pixel_values[r][:int(np.prod(batch.image_grid_thw[r]))]] for r in range(b)]
    grids = [[batch.image_grid_thw[r]] for r in range(b)]
    active, sampled, zooms = list(range(b)), 0, 0
    h, w = scripted.IMAGE_HW
    for turn in range(4):
        if not active:
            break
        length = max(len(seqs[r]) for r in active)
        ids = np.zeros((len(active), length), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(active):
            ids[i, length - len(seqs[r]):], mask[i, length - len(seqs[r]):] = seqs[r], 1
        out = hf_generate(model, ids, mask, np.concatenate([p for r in active for p in images[r]]),
                           np.stack([g for r in active for g in grids[r]]).astype(np.int64), cfg.image_token_id,
                           max_new_tokens=64, do_sample=False, eos_token_id=tpl.im_end)
        still = []
        for i, r in enumerate(active):
            new = out[i].tolist()
            new = new[:new.index(tpl.im_end) + 1] if tpl.im_end in new else new
            sampled += len(new)
            seqs[r] += new
            result = reference(tok.decode(new, skip_special_tokens=False), w, h)
            if turn == 3 or result["status"] in ("answer", "none") or new[-1] != tpl.im_end:
                continue
            if result["status"] == "zoom":
                original = setup.images[r % len(scripted.SCRIPTS)] if originals is None else originals[r]
                crop = PIL.Image.fromarray(original).crop(
                    tuple(round(v) for v in result["bbox"]))
                proc = processor(images=[crop], return_tensors="np")
                images[r].append(proc["pixel_values"].astype(np.float32))
                grids[r].append(proc["image_grid_thw"][0])
                n = int(proc["image_grid_thw"][0].prod()) // 4
                seqs[r] += list(tpl.zoom_prefix) + [tpl.image_pad] * n + list(tpl.zoom_suffix)
                zooms += 1
            else:
                seqs[r] += list(tpl.errors[{n: k for k, n in tools.ERROR_NAMES.items()}[result["error"]]])
            still.append(r)
        active = still
    return time.perf_counter() - t, sampled, zooms
