"""A Qwen2.5-sized byte-level BPE tokenizer built in code (the real one cannot be downloaded here).

151,643 learned tokens (the 256 byte symbols, every two-symbol pair, then three-symbol tokens) and Qwen2.5's
22 added tokens at their real ids (<|endoftext|> 151643 ... <|image_pad|> 151655 ... <|file_sep|> 151664),
Qwen's normaliser, split regex, byte-level pre-tokenizer and decoder. The merges are synthetic, so texts split
into 1-3 byte tokens, but every path that depends on the vocabulary's size and the special ids (templates,
the recogniser's byte table, rewards, the embedding and head sizes) runs as with the real checkpoint.
"""

from __future__ import annotations

import os

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from deepeyes_jax.data.tokenizer import SPECIAL_TOKENS, SPLIT_REGEX

LEARNED = 151643
ADDED = SPECIAL_TOKENS + ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                          "<|file_sep|>")  # Qwen2.5's 22 added tokens, in id order from 151643
VOCAB_SIZE = 152064  # the 7B checkpoint's embedding rows (the vocabulary padded to a multiple of 128)


def build(directory: str | os.PathLike | None = None) -> transformers.PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    pairs = iter(list(vocab)[len(alphabet):])
    while len(vocab) < LEARNED:
        ab = next(pairs)
        for c in alphabet:
            if len(vocab) == LEARNED:
                break
            merges.append((ab, c))
            vocab[ab + c] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED])
    tokenizer = transformers.Qwen2TokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        clean_up_tokenization_spaces=False, errors="replace", split_special_tokens=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(ADDED)})
    if directory is not None:
        tokenizer.save_pretrained(os.fspath(directory))
    return tokenizer
