#!/usr/bin/env python3
"""Rebuild the embedded default corpus and its BPE tokenizer from Debian packages.

Sources (both public domain texts, fetched with ``apt-get download``; nothing else
from the network is used):

* ``r-cran-janeaustenr`` 1.0.0-1 -- Jane Austen's six completed novels (Project
  Gutenberg texts), stored as R lazy-load data; decoded here with a small reader
  for R's XDR serialization format (R itself is not needed).
* ``sword-text-web`` 426.0-1 -- the World English Bible (engWEB2015eb SWORD
  zText module); decoded here with a small reader for the zText format. The 66
  books of the Protestant canon are kept; the preface, the glossary and the
  deuterocanon (whose Greek Daniel is malformed in this module) are dropped.

Outputs, written next to this script:

* ``corpus.txt.gz`` -- UTF-8 text, one paragraph per line (Austen's novels in
  publication order, then the Bible from Genesis to Revelation), gzip with
  mtime=0 and no file name so the bytes depend only on the text.
* ``tokenizer.json`` -- byte-level BPE (``tokenizers``), vocab 8192,
  ``<|endoftext|>`` as id 0, ByteLevel pre-tokenizer / decoder / post-processor.
* ``tokenizer_config.json`` -- lets ``transformers.AutoTokenizer.from_pretrained("corpus")``
  load the same tokenizer.

Cleaning is minimal: line endings normalised, hard-wrapped lines joined into
paragraphs, whitespace collapsed, Gutenberg ``_italic_`` underscores removed,
typographic quotes/dashes mapped to ASCII (the Bible uses curly quotes and em
dashes, the novels ASCII quotes and "--"), OSIS markup and Bible footnotes
stripped, and a modern publisher's note at the end of Northanger Abbey dropped.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Debian packages (bookworm) the corpus is built from, pinned to the versions used for the
# committed files, with the sha256 of each .deb as downloaded.
PACKAGES = {
    "r-cran-janeaustenr": ("1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
    "sword-text-web": ("426.0-1", "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"),
}

AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
# Publication order.
AUSTEN_NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                 "northangerabbey", "persuasion"]

WEB_DATA = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
PROTESTANT_CANON = (
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps "
    "Prov Eccl Song Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal "
    "Matt Mark Luke John Acts Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm "
    "Heb Jas 1Pet 2Pet 1John 2John 3John Jude Rev"
).split()

VOCAB_SIZE = 8192
EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------- packages

def fetch_debs(deb_dir: Path, check_sha: bool) -> dict[str, Path]:
    """Download the pinned .debs into deb_dir (unless already there) and return their paths."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (version, sha) in PACKAGES.items():
        path = deb_dir / f"{name}_{version}_all.deb"
        if not path.exists():
            print(f"apt-get download {name}={version}", file=sys.stderr)
            subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=deb_dir, check=True)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha:
            msg = f"{path.name}: sha256 {digest} differs from the pinned {sha}"
            if check_sha:
                raise SystemExit(msg + " (use --no-check-sha to build anyway)")
            print("warning: " + msg, file=sys.stderr)
        out[name] = path
    return out


def extract_deb(deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest


# ----------------------------------------------------------------------------- R data

class _RReader:
    """Just enough of R's XDR serialization format to read character vectors and lists."""

    def __init__(self, data: bytes):
        self.b, self.p, self.refs = data, 0, []
        if self._raw(2) != b"X\n":
            raise ValueError("not an XDR R serialization stream")
        version = self._int()
        self._int(), self._int()  # writer version, minimal reader version
        if version == 3:
            self._raw(self._int())  # native encoding name

    def _raw(self, n: int) -> bytes:
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def _int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def _length(self) -> int:
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) | lo
        return n

    def read(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t == 254:  # NILVALUE_SXP
            return None
        if t in (242, 241, 253, 252, 251, 250):  # empty/base/global env, unbound, missing, base ns
            return ("special", t)
        if t == 255:  # REFSXP
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            sym = ("sym", self.read())
            self.refs.append(sym)
            return sym
        if t == 9:  # CHARSXP
            n = self._int()
            return None if n == -1 else self._raw(n).decode("utf-8")
        if t in (2, 6, 239, 240):  # pairlists
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            car, cdr = self.read(), self.read()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self._length()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self._length()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            v = [self.read() for _ in range(self._length())]
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            attrs = self.read()
            names = [val for tag, val in attrs if tag == ("sym", "names")]
            if names:
                return dict(zip(names[0], v))
        return v


def read_r_lazyload(prefix: Path) -> dict:
    """Read every object of an R lazy-load database (prefix.rdx index + prefix.rdb blobs)."""
    index = _RReader(gzip.decompress(prefix.with_suffix(".rdx").read_bytes())).read()
    if index["compressed"] != [1]:
        raise ValueError("only zlib-compressed lazy-load databases are supported")
    rdb = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (off, length) in index["variables"].items():
        blob = rdb[int(off):int(off) + int(length)]
        out[name] = _RReader(zlib.decompress(blob[4:])).read()  # 4 bytes: uncompressed length
    return out


def austen_paragraphs(root: Path) -> list[str]:
    books = read_r_lazyload(root / AUSTEN_DATA / "Rdata")
    paras: list[str] = []
    for name in AUSTEN_NOVELS:
        lines = books[name]
        if name == "northangerabbey":  # drop the modern publisher's "A NOTE ON THE TEXT"
            lines = lines[:lines.index("A NOTE ON THE TEXT")]
        cur: list[str] = []
        for line in lines + [""]:
            if line.strip():
                cur.append(line)
            elif cur:
                paras.append(" ".join(cur))
                cur = []
    return paras


# ----------------------------------------------------------------------------- SWORD zText

def read_ztext(module_dir: Path, testament: str) -> list[str]:
    """All non-empty verse entries of one testament ("ot"/"nt") of a zText module, in order."""
    bzs = (module_dir / f"{testament}.bzs").read_bytes()  # block index: offset, size, raw size
    bzv = (module_dir / f"{testament}.bzv").read_bytes()  # verse index: block, offset, size
    bzz = (module_dir / f"{testament}.bzz").read_bytes()  # zlib-compressed blocks
    blocks = []
    for k in range(len(bzs) // 12):
        off, size, raw_size = struct.unpack_from("<III", bzs, 12 * k)
        block = zlib.decompress(bzz[off:off + size])
        assert len(block) == raw_size
        blocks.append(block)
    verses = []
    for k in range(len(bzv) // 10):
        block, off, size = struct.unpack_from("<IIH", bzv, 10 * k)
        if size:
            verses.append(blocks[block][off:off + size].decode("utf-8"))
    return verses


_BOOK_OR_CHAPTER = re.compile(r'<(?:div|chapter)\b[^>]*>')
_NOTE = re.compile(r'<note\b[^>]*>.*?</note>', re.S)
_BREAK = re.compile(r'</?(?:div|chapter|lg|lb|title|item|list|speaker)\b[^>]*>')
_TAG = re.compile(r'<[^>]*>')


def web_paragraphs(root: Path) -> list[str]:
    module = root / WEB_DATA
    osis = " ".join(read_ztext(module, "ot") + read_ztext(module, "nt"))
    # Attribute every stretch of text to the book of the last book/chapter start before it.
    # A book end (or the glossary) switches to "no book", so front and back matter are dropped.
    keep: list[str] = []
    book, pos = None, 0
    for m in _BOOK_OR_CHAPTER.finditer(osis):
        tag = m.group(0)
        if book in PROTESTANT_CANON:
            keep.append(osis[pos:m.start()])
        pos = m.end()
        keep.append("\n")  # every div/chapter boundary also ends a paragraph
        if tag.startswith("<chapter") and "sID=" in tag:
            book = re.search(r'osisID="([^".]+)', tag).group(1)
        elif 'type="book"' in tag:
            book = re.search(r'osisID="([^"]+)"', tag).group(1) if "sID=" in tag else None
        elif 'type="glossary"' in tag or 'type="front"' in tag:
            book = None
    if book in PROTESTANT_CANON:
        keep.append(osis[pos:])
    text = "".join(keep)
    # Footnotes and cross references go; a marker keeps "God<note/>created" from gluing words.
    text = _NOTE.sub("\x00", text)
    text = re.sub(r"</title>\s*<title\b[^>]*>", " ", text)  # one line for a multi-part title
    text = _BREAK.sub("\n", text)
    text = html.unescape(_TAG.sub("", text))
    text = re.sub(r"\x00+(?=[\s,.;:!?)\]\u201d\u2019]|$)", "", text)
    text = re.sub(r"(?<=\s)\x00+", "", text).replace("\x00", " ")
    return text.split("\n")


# ----------------------------------------------------------------------------- text

_PUNCT = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                        "\u2014": "--", "\u2013": "-", "\u00a0": " "})


def normalise(paragraph: str) -> str:
    p = paragraph.replace("\r\n", "\n").replace("\r", "\n").translate(_PUNCT)
    p = re.sub(r"(?<![A-Za-z0-9_])_([^_]+)_(?![A-Za-z0-9_])", r"\1", p)  # _italics_
    return " ".join(p.split())


def build_text(root: Path) -> str:
    lines = [normalise(p) for p in austen_paragraphs(root) + web_paragraphs(root)]
    return "".join(line + "\n" for line in lines if line)


def write_gzip(path: Path, text: str) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    lines = text.splitlines()
    tok.train_from_iterator((lines[i:i + 1000] for i in range(0, len(lines), 1000)),
                            trainer=trainer, length=len(lines))
    assert tok.token_to_id(EOS) == 0 and tok.get_vocab_size() == VOCAB_SIZE
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": EOS,
    "eos_token": EOS,
    "unk_token": EOS,
    "model_max_length": 1_000_000_000,
    "clean_up_tokenization_spaces": False,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A plain run downloads the pinned .debs with `apt-get download` (run "
        "`apt-get update` once first; no root needed), rewrites the files above and prints "
        "their sha256, sizes and the corpus token count, which corpus/README.md records.",
    )
    ap.add_argument("--deb-dir", type=Path,
                    help="folder holding (or to receive) the .deb files; default: a temporary folder")
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where to write the outputs (default: %(default)s)")
    ap.add_argument("--no-check-sha", action="store_true", help="only warn if a .deb's sha256 differs from the pin")
    ap.add_argument("--skip-tokenizer", action="store_true", help="only (re)build corpus.txt.gz")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="attnsweep-corpus-"))
    try:
        debs = fetch_debs(args.deb_dir or tmp / "debs", check_sha=not args.no_check_sha)
        root = tmp / "root"
        for deb in debs.values():
            extract_deb(deb, root)
        text = build_text(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    gz = args.out_dir / "corpus.txt.gz"
    write_gzip(gz, text)
    print(f"corpus.txt.gz: sha256 {hashlib.sha256(gz.read_bytes()).hexdigest()}, {gz.stat().st_size} bytes; "
          f"text: {len(text.encode('utf-8'))} bytes, {text.count(chr(10))} lines, {len(text)} characters")
    if not args.skip_tokenizer:
        tok = train_tokenizer(text)
        tj = args.out_dir / "tokenizer.json"
        tok.save(str(tj))
        (args.out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        lines = text.splitlines()
        n_tokens = sum(len(e.ids) for i in range(0, len(lines), 4096)
                       for e in tok.encode_batch(lines[i:i + 4096]))
        print(f"tokenizer.json: sha256 {hashlib.sha256(tj.read_bytes()).hexdigest()}, "
              f"vocab {tok.get_vocab_size()}, corpus tokens {n_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
