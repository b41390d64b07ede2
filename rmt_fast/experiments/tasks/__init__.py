"""Synthetic long-context memory tasks of the RMT paper (arXiv 2304.11062): Memorize, Detect & Memorize
and Reasoning, with exact token budgets, deterministic samples and pluggable noise.

Quick start::

    from rmt_fast.experiments.tasks import make_task, collate, WordTokenizer
    ds = make_task("detect_memorize", WordTokenizer(), num_segments=4, segment_size=32)
    batch = collate([ds[0], ds[1]])      # input_ids [2, 128], labels [2] (index into ds.answers)
"""
from .dataset import PLACEMENTS, SPLITS, TASKS, MemoryTaskDataset, collate, default_noise, make_task
from .facts import (ANSWERS, DIRECTIONS, NAMES, OPPOSITE, PLACES, VERBS, Example, answer_qa4,
                    read_babi)
from .noise import (HFDatasetNoise, NoiseSource, PydocNoise, SentencesNoise, TaskFileNotFoundError,
                    TextFilesNoise, TokenPool, clean_text, split_sentences)
from .tokenization import (SAVED_TOKENIZER_FILE, CharTokenizer, WordTokenizer, encode_batch, load_saved_tokenizer,
                           piece_prefix)

__all__ = [
    "TASKS", "SPLITS", "PLACEMENTS", "ANSWERS", "NAMES", "VERBS", "PLACES", "DIRECTIONS", "OPPOSITE",
    "make_task", "collate", "MemoryTaskDataset", "default_noise", "Example", "read_babi", "answer_qa4",
    "NoiseSource", "PydocNoise", "TextFilesNoise", "HFDatasetNoise", "SentencesNoise", "TokenPool",
    "TaskFileNotFoundError", "clean_text", "split_sentences",
    "WordTokenizer", "CharTokenizer", "load_saved_tokenizer", "encode_batch", "piece_prefix",
]
