"""Clinical language modelling across hospitals: a small causal language model that
every hospital holds on its own disk (models/tiny-lm), fine-tuned on each hospital's
own notes with a LoRA adapter. Only the adapter's matrices travel: the base model and
the notes never leave the site.

Each site's folder holds ``notes.txt``, one note a line. In a simulation the folder is
``data/<site>``; in deployment it is what the hospital passes to
``fedloom collaborator start --data /path/to/its/notes``.
"""

from pathlib import Path

import torch

from fedloom.tasks.hf_task import HFTask

# The model reads characters: the printable ASCII characters and the newline, each its
# own token (the base model was built with this vocabulary).
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
BLOCK = 64  # characters a training sample holds


def encode(text: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index[c] for c in text if c in index], dtype=torch.long)


def blocks(path: Path) -> list[torch.Tensor]:
    """The text cut into blocks of BLOCK characters (the model learns each next one)."""
    ids = encode(Path(path).read_text(encoding="utf-8"))
    return [ids[i : i + BLOCK] for i in range(0, len(ids) - BLOCK + 1, BLOCK)]


def load_data(ctx):
    """The site's notes: every tenth block validates, the rest trains."""
    samples = blocks(Path(ctx.data_path) / "notes.txt")
    val = samples[::10]
    train = [b for i, b in enumerate(samples) if i % 10]
    return train, val


def load_test_data(ctx):
    return blocks(Path(ctx.data_path) / "notes.txt")


task = HFTask(
    "causal-lm",
    # rank-8 adapters on the attention's query and value projections
    lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    data=load_data,
    test_data=load_test_data,
)
