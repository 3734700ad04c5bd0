"""The demo corpus: the Python standard library's own documentation topics (real English
prose about Python, shipped with every CPython as `pydoc_data.topics`, no download)."""

from __future__ import annotations

from ctx.data.source import Document
from ctx.errors import InputError


def demo_documents(split: str, validation_fraction: float = 0.1) -> list[Document]:
    """One document per pydoc topic; every k-th topic (by name) is held out for validation."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    every = max(2, round(1 / validation_fraction)) if validation_fraction > 0 else 0
    held_out = {name for i, name in enumerate(names) if every and i % every == every // 2}
    if split == "train":
        chosen = [n for n in names if n not in held_out]
    elif split == "validation":
        chosen = [n for n in names if n in held_out]
    else:
        raise InputError(f"the demo corpus has splits 'train' and 'validation', not {split!r}")
    return [Document(id=name, text=topics[name]) for name in chosen]
