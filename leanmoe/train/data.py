"""A run's data: the tokenizer (reused or trained on the corpus) and the token shards it trains
and validates on, checked to hold at least one window each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from leanmoe.config import ModelConfig
from leanmoe.data.loader import eval_batches
from leanmoe.data.shards import ShardSet, build_shards
from leanmoe.data.sources import empty_corpus_error, iter_documents, resolve_sources
from leanmoe.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from leanmoe.parallel.world import World
from leanmoe.train.config import TrainConfig, TrainingError

__all__ = ["prepare_data"]


def prepare_data(tc: TrainConfig, cfg: ModelConfig, run_dir: Path, tokenizer_from: str | Path | None,
                 world: World, say: Callable[[str], None]) -> tuple[Tokenizer, ShardSet]:
    """(tokenizer, shards) for a run. The tokenizer is loaded from `tokenizer_from` (a checkpoint,
    --tokenizer, or on ranks > 0 the run folder rank 0 just wrote) or, when None, trained on the
    training documents; rank 0 saves it into `run_dir`. Shards are cached (leanmoe.data.shards)."""
    sources = resolve_sources(tc.data, stream_max_bytes=int(tc.stream_limit))
    if tokenizer_from is not None:
        tokenizer = load_tokenizer(tokenizer_from)
    else:
        say(f"training a {cfg.vocab_size}-token byte-level BPE tokenizer on {', '.join(s.describe() for s in sources)}")
        docs = (d for d in iter_documents(sources, None, tc.val_fraction) if d.text)
        if next(docs, None) is None:
            raise empty_corpus_error(sources)
        # fit on training documents only (the first one may be a validation document; it is only
        # used to detect an empty corpus)
        texts = (doc.text for doc in iter_documents(sources, "train", tc.val_fraction))
        tokenizer = train_tokenizer(texts, cfg.vocab_size, show_progress=tc.progress)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TrainingError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                            f"{cfg.vocab_size}; use a smaller tokenizer or a config with vocab_size >= "
                            f"{tokenizer.vocab_size}")
    if world.is_rank0:
        tokenizer.save(run_dir)
    shards = build_shards(sources, tokenizer, val_fraction=tc.val_fraction, progress=tc.progress and world.is_rank0)
    for split in ("train", "val"):
        n = len(getattr(shards, split))
        if n < tc.seq_len + 1:
            raise TrainingError(f"the {split} split has {n} tokens, fewer than one window of --seq-len "
                                f"{tc.seq_len} + 1; add data or lower --seq-len")
    if world.distributed:  # every rank needs a validation batch: fail now, not at the first evaluation
        next(eval_batches(shards.val, tc.micro_batch_size, tc.seq_len, tc.eval_batches, rank=world.rank,
                          world_size=world.size))
    return tokenizer, shards
