"""int4train's training CLI, `python -m int4train.train`: a GPT-style decoder on a text file (lm), a
pretrained encoder fine-tuned on JSONL records (textcls), or a small ViT on images (imagecls), trained
under one or more int4train recipes and compared side by side. docs/training.md describes it.
"""

from .cli import main

__all__ = ["main"]
