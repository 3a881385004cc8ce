"""Data: corpus sources -> byte-level BPE tokenizer -> token shards -> training / validation batches.

    sources = resolve_sources(["data/", "hf:wikitext:wikitext-2-raw-v1"])   # or None: the stdlib
    tok = train_tokenizer(iter_documents(sources, "train"), vocab_size=8192)
    shards = build_shards(sources, tok)                                      # cached by content
    loader = TokenLoader(shards.train, batch_size=8, seq_len=256, seed=0)
    x, y = loader.next_batch()                                               # int64 [B, T]

See each module's docstring for the file formats and the reasons behind them.
"""

from leanmoe.data.loader import TokenLoader, eval_batches
from leanmoe.data.shards import ShardSet, build_shards, default_cache_dir
from leanmoe.data.sources import (DataError, Document, FileSource, HFSource, Source, TextSource, default_sources,
                                  iter_documents, resolve_sources, split_of)
from leanmoe.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["DataError", "Document", "Source", "TextSource", "FileSource", "HFSource", "resolve_sources",
           "default_sources", "iter_documents", "split_of", "Tokenizer", "train_tokenizer", "load_tokenizer",
           "SPECIAL_TOKENS", "ShardSet", "build_shards", "TokenLoader", "eval_batches", "default_cache_dir"]
