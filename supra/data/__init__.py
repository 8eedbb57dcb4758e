"""Training data: pretokenized token shards, open_lm webdatasets, local text, resumable loaders.

Every dataset is map-style and yields windows of ``seq_len + 1`` tokens as
``{"tokens", "labels", "positions"}`` (LongTensor [seq_len] each); ``build_dataloader`` batches them
to [B, seq_len] across ranks and workers and resumes exactly from its ``state_dict``.
"""

from supra.data.loader import (
    InfiniteLoader,
    ShardedSampler,
    build_dataloader,
    collate_windows,
    cu_seqlens_from_positions,
)
from supra.data.open_lm import OpenLMWebDataset
from supra.data.shards import TokenShardDataset, read_index, write_token_shards
from supra.data.text import TextDataset
from supra.data.tokenize import load_tokenizer, save_tokenizer_files, tokenize_files

__all__ = [
    "InfiniteLoader",
    "OpenLMWebDataset",
    "ShardedSampler",
    "TextDataset",
    "TokenShardDataset",
    "build_dataloader",
    "collate_windows",
    "cu_seqlens_from_positions",
    "load_tokenizer",
    "read_index",
    "save_tokenizer_files",
    "tokenize_files",
    "write_token_shards",
]
