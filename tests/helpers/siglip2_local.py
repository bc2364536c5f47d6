"""A tiny random SigLIP2 (text + vision towers, word-level tokenizer) saved to a local directory:
what the understanding losses load from a path, built here instead of downloaded."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Siglip2Config, Siglip2Model

from atoken.model.understanding import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT

# Every caption word the tests use; anything else maps to <unk>.
WORDS = ["<pad>", "<unk>", "a", "photo", "video", "of", "cat", "dog", "bird", "bike", "bikes", "car", "phone",
         "person", "street", "riding", "white", "bunny", "toy", "plane", "airplane", "coloured", "cow", "3d",
         "model", "in", "the", "and", "rabbit"]


def write_tiny_siglip2(path: Path, width: int, heads: int, mlp: int, seed: int = 0, max_length: int = 64) -> Path:
    cfg = Siglip2Config(
        text_config=dict(vocab_size=len(WORDS), hidden_size=width, intermediate_size=mlp, num_hidden_layers=2,
                         num_attention_heads=heads, max_position_embeddings=max_length, projection_size=width),
        vision_config=dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=2, num_attention_heads=heads,
                           num_patches=256))
    torch.manual_seed(seed)
    model = Siglip2Model(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE_INIT)
        model.logit_bias.fill_(LOGIT_BIAS_INIT)
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    return path
