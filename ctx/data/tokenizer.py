"""Tokenizers: text <-> token ids, and `python -m ctx.data.tokenizer` to train SentencePiece.

Every document's input starts with the tokenizer's BOS id, so every real token (the first
one included) is predicted and scored.

    python -m ctx.data.tokenizer --input=/data/pg19 --vocab_size=32000 --output=pg19_32k

writes pg19_32k.model and pg19_32k.vocab (SentencePiece's convention) from a sample of the
training text (a file, a folder of .txt files, or a PG-19 layout whose train/ is used).
The settings round-trip exactly: decode(encode(text)) == text, newlines and runs of spaces
included, and unseen characters fall back to bytes (no UNK).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Iterator

import numpy as np

from absl import flags
from ctx.errors import InputError, MissingInput

# SentencePiece options under which decode(encode(text)) == text for any text.
ROUND_TRIP_OPTIONS = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    user_defined_symbols=["\n", "\r", "\t"],
    allow_whitespace_only_pieces=True,
    split_by_whitespace=True,
    byte_fallback=True,
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    max_sentence_length=1 << 16,
)


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). Id 0 (the NUL byte, absent from text) is BOS.

    Text decoded from arbitrary bytes with errors='surrogateescape' (enwik8) encodes back to
    exactly those bytes."""

    vocab_size = 256
    bos_id = 0
    fingerprint = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "surrogateescape"), np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A trained SentencePiece model (the PG-19 setting: 32k subwords)."""

    def __init__(self, path: str) -> None:
        import sentencepiece as spm
        from etils import epath

        if not epath.Path(path).is_file():
            raise MissingInput(
                f"data.tokenizer={path} does not exist; train one with "
                "`python -m ctx.data.tokenizer --input=... --output=PREFIX`"
            )
        blob = epath.Path(path).read_bytes()  # local or gs://
        unusable = f"data.tokenizer={path} is not a SentencePiece model"
        fix = "give the .model file that `python -m ctx.data.tokenizer` wrote, or 'bytes'"
        if not blob:
            raise InputError(f"{unusable} (the file is empty); {fix}")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=blob)
        except RuntimeError as error:
            raise InputError(f"{unusable} ({str(error).strip()[:200]}); {fix}") from None
        if (
            self._sp.get_piece_size() == 0
        ):  # SentencePiece loads some broken files as an empty model
            raise InputError(f"{unusable} (it holds no pieces); {fix}")
        self.path = path
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else 0
        self.fingerprint = "spm-" + hashlib.sha256(blob).hexdigest()[:16]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many documents at once on all cores (SentencePiece's own threads)."""
        return [
            np.asarray(ids, np.int32)
            for ids in self._sp.encode(texts, num_threads=os.cpu_count() or 1)
        ]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(spec: str):
    """'bytes' or the path of a SentencePiece model."""
    if spec == "bytes":
        return ByteTokenizer()
    if not spec:
        raise InputError(
            "data.tokenizer is empty; use 'bytes' or the path of a SentencePiece .model"
        )
    return SentencePieceTokenizer(spec)


def _text_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise MissingInput(f"--input={path} does not exist")
    if os.path.isfile(os.path.join(path, "metadata.csv")) and os.path.isdir(
        os.path.join(path, "train")
    ):
        path = os.path.join(path, "train")  # a PG-19 layout: sample the training split
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(path)
        for name in names
        if name.endswith((".txt", ".tokens"))
    )
    if not files:
        raise MissingInput(f"--input={path} holds no .txt files")
    return files


def _sample_lines(files: list[str], max_bytes: int, seed: int) -> Iterator[str]:
    """Lines from a seeded random sample of the files, up to max_bytes in total."""
    order = np.random.default_rng(seed).permutation(len(files))
    total = 0
    for i in order:
        with open(files[i], encoding="utf-8", errors="replace") as f:
            for line in f:
                total += len(line)
                yield line
                if total >= max_bytes:
                    return


def train_sentencepiece(
    input_path: str,
    vocab_size: int,
    output_prefix: str,
    max_bytes: int = 200_000_000,
    seed: int = 0,
    threads: int = 0,
) -> str:
    """Train a round-tripping SentencePiece model; returns the .model path."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise InputError(
            f"--vocab_size={vocab_size} is too small: byte fallback alone takes 259 ids"
        )
    files = _text_files(input_path)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise MissingInput(f"--output={output_prefix}: folder {out_dir} does not exist")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as sample:
        for line in _sample_lines(files, max_bytes, seed):
            sample.write(line)
    try:
        spm.SentencePieceTrainer.train(
            input=sample.name,
            model_prefix=output_prefix,
            vocab_size=vocab_size,
            num_threads=threads or os.cpu_count() or 1,
            input_sentence_size=10_000_000,
            shuffle_input_sentence=True,
            minloglevel=2,
            **ROUND_TRIP_OPTIONS,
        )
    except RuntimeError as error:
        raise InputError(
            f"SentencePiece training failed: {str(error).strip().splitlines()[-1]} "
            "(with little text, lower --vocab_size)"
        ) from None
    finally:
        os.unlink(sample.name)
    return output_prefix + ".model"


def check_vocab(tokenizer, config: Any) -> None:
    """The model's output layer must have one row per token of the tokenizer."""
    if tokenizer.vocab_size != config.model.vocab_size:
        raise InputError(
            f"the tokenizer ({config.data.tokenizer}) has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={config.model.vocab_size}; set --config.model.vocab_size="
            f"{tokenizer.vocab_size} or use the matching tokenizer"
        )


def main() -> None:
    options = flags.FLAGS
    path = train_sentencepiece(
        options.input, options.vocab_size, options.output, options.max_bytes, options.seed
    )
    tokenizer = SentencePieceTokenizer(path)
    print(f"wrote {path} and {options.output}.vocab ({tokenizer.vocab_size} pieces)")


if __name__ == "__main__":  # the command line only: importing the tokenizer loads no CLI
    from ctx.cli import define_common_flags, run_main

    define_common_flags()
    flags.DEFINE_string(
        "input", None, "A text file, a folder of .txt files, or a PG-19 layout folder."
    )
    flags.DEFINE_integer(
        "vocab_size",
        32000,
        "Number of pieces (at least 300: byte fallback takes 259).",
        lower_bound=300,
    )
    flags.DEFINE_string("output", None, "Output prefix: writes PREFIX.model and PREFIX.vocab.")
    flags.DEFINE_integer(
        "max_bytes", 200_000_000, "How much text to sample for training.", lower_bound=1
    )
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.mark_flags_as_required(["input", "output"])
    run_main(main, needs_config=False)
