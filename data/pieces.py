"""Long documents cut into pieces (`data.max_doc_chars`).

A source whose documents are whole files of very different lengths (the stdlib corpus: most
files a few KB, some hundreds of KB) streams a long file as hundreds of consecutive rows of
one kind of text, and the training loss jumps for as long as it lasts: a document shuffle
buffer only moves the file, it cannot mix it with others. Cut into pieces that are documents
of their own, the file is shuffled, held out and packed piece by piece.
"""

from __future__ import annotations


def split_document(text: str, max_chars: int) -> list[str]:
    """`text` as pieces of at most `max_chars` characters, in order, joined giving `text` back:
    each cut is after the last line end that fits (a line longer than `max_chars` is cut where
    it reaches it). `max_chars` 0: the text whole."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        newline = text.rfind("\n", start, start + max_chars)
        end = newline + 1 if newline >= start else start + max_chars
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces
