"""data.max_doc_chars: long documents read as pieces, each a document of its own."""

from __future__ import annotations

from data.config import DataConfig
from data.holdout import Holdout
from data.pieces import split_document
from data.sources import SourceReader, source_specs


def test_pieces_are_cut_after_line_ends_and_give_the_text_back():
    text = "".join(f"line {i}\n" for i in range(100)) + "x" * 25 + "\nend"
    pieces = split_document(text, 20)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= 20 for p in pieces)
    # every cut is after a newline, except inside the 25-character line that cannot fit
    cuts = [p for p in pieces[:-1] if not p.endswith("\n")]
    assert cuts == ["x" * 20]
    assert split_document(text, 0) == [text] and split_document("short", 20) == ["short"]


def test_the_reader_yields_pieces_and_holds_out_piece_by_piece(tmp_path):
    long = "".join(f"def f{i}(): return {i}\n" for i in range(400))  # ~9 KB, one file
    (tmp_path / "a.txt").write_text(long)
    (tmp_path / "b.txt").write_text("small file\n")
    cfg = DataConfig(source="files", path=str(tmp_path), max_doc_chars=512)
    ((key, spec),) = source_specs(cfg)

    def one_pass(holdout=None):
        reader = SourceReader(spec, key, 0, 1, holdout, max_doc_chars=512)
        texts = []
        while reader.epoch == 0:
            texts.append(reader.next_text())
        reader.close()
        return texts[:-1]  # the last one is from the next pass

    pieces = one_pass()
    assert "".join(pieces[:-1]) == long and pieces[-1] == "small file\n"
    assert len(pieces) > 15 and max(len(p) for p in pieces) <= 512
    train = one_pass(Holdout(0.3, held_out=False))
    held = one_pass(Holdout(0.3, held_out=True))
    assert train and held and sorted(train + held) == sorted(pieces)  # split by piece
