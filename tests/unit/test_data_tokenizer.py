"""HF tokenizer folders as data.tokenizer, and tools/train_tokenizer.py that makes them."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT
from data.config import DataConfig
from data.pipeline import TextBatches
from data.tokenizers import build_tokenizer
from tools.train_tokenizer import BOS, EOS, PAD, corpus_texts, limit_bytes, main, train_bpe
from torchprime.errors import ConfigError

TEXT = "déjà vu → 東京 🚀\n\tdef f(x):\n        return x  # <|end_of_text|> is text here\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 512-token byte-level BPE trained on the first ~200 kB of the default corpus."""
    out = tmp_path_factory.mktemp("tok") / "bpe512"
    return train_bpe(limit_bytes(corpus_texts("stdlib"), 200_000), 512, out)


def test_a_trained_bpe_loads_with_its_special_tokens_and_round_trips_text(bpe):
    tok = build_tokenizer(str(bpe))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 512)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.eos_id not in ids  # a special token's text in the data stays text
    code = "    def __init__(self, *args, **kwargs):\n        return None\n"
    assert len(tok.encode(code)) < 0.5 * len(code.encode())  # merges learned from Python


def test_the_pipeline_reads_through_a_tokenizer_folder(bpe):
    cfg = DataConfig(tokenizer=str(bpe), block_size=64, packing="document")
    tok = build_tokenizer(cfg.tokenizer)
    batch = next(TextBatches(cfg, tok, batch_size=2))
    ids = batch["input_ids"]
    assert ids.shape == (2, 64) and int(ids.max()) < 512
    # the first document of the corpus, decoded back from the row
    first = tok.decode(ids[0].tolist())
    assert first.startswith('"""Record of phased-in incompatible language changes.')


def test_the_command_line_writes_a_folder_the_pipeline_reads(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(f"the quick brown fox {i} jumps over the lazy dog\n" * 5)
    out = tmp_path / "tok"
    # main() is what `python -m tools.train_tokenizer ...` runs (in-process: no second start-up)
    assert main(["--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)
    tok = build_tokenizer(str(out))
    assert tok.vocab_size == 300 and tok.decode(tok.encode("the lazy fox")) == "the lazy fox"


def test_too_small_a_vocabulary_is_refused(tmp_path, capsys):
    args = ["--corpus", "stdlib", "--vocab-size", "100", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "--vocab-size 100: at least 259" in capsys.readouterr().err


def copy_without(bpe, tmp_path, drop):
    """The folder with `drop` left out of its special tokens."""
    folder = tmp_path / "tok"
    shutil.copytree(bpe, folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        entries = json.loads((folder / name).read_text())
        for key in drop:
            entries.pop(key, None)
        (folder / name).write_text(json.dumps(entries))
    return folder


def test_a_folder_without_eos_is_an_error_naming_the_files(bpe, tmp_path):
    folder = copy_without(bpe, tmp_path, ["eos_token"])
    with pytest.raises(ConfigError, match=r"names no eos_token \(looked in tokenizer_config.json"):
        build_tokenizer(str(folder))


def test_bos_and_pad_fall_back_to_eos(bpe, tmp_path):
    tok = build_tokenizer(str(copy_without(bpe, tmp_path, ["bos_token", "pad_token"])))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 1, 1)


def test_a_special_token_missing_from_the_vocabulary_is_named(bpe, tmp_path):
    folder = copy_without(bpe, tmp_path, [])
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    with pytest.raises(ConfigError, match=r"eos_token '</s>' is not in tokenizer.json's vocab"):
        build_tokenizer(str(folder))


def test_a_prefix_is_tokenized_like_the_whole_text(bpe):
    # pad packing asks for a row's worth of tokens of documents that may be far longer
    texts = list(limit_bytes(corpus_texts("stdlib"), 400_000))[-20:]
    tok = build_tokenizer(str(bpe))
    byte = build_tokenizer("byte")
    for text in texts + [TEXT * 50]:
        full, full_bytes = tok.encode(text), byte.encode(text)
        for n in (1, 7, 256, 1000):
            assert tok.encode(text, max_tokens=n) == full[:n]
            assert byte.encode(text, max_tokens=n) == full_bytes[:n]


# Runs main() several times per corpus format in one fresh process: the tool used to crash
# (SIGSEGV, exit -11 here) in about one run of three on JSON lines, when the `datasets` stream
# was read from the tokenizers library's worker threads. A crash would end the process, so it
# is not pytest's own.
_REPEAT = """
import sys
from tools.train_tokenizer import main
root, runs = sys.argv[1], int(sys.argv[2])
for fmt, corpus in (("json", "jsonl"), ("text", "txt"), ("parquet", "parquet")):
    for run in range(runs):
        out = f"{root}/tok-{fmt}-{run}"
        argv = ["--corpus", f"{root}/{corpus}", "--format", fmt, "--vocab-size", "300"]
        assert main([*argv, "--out", out, "--min-frequency", "1"]) == 0, (fmt, run)
        print(fmt, run, "ok", flush=True)
"""


def test_the_tool_trains_again_and_again_on_json_lines_text_and_parquet(tmp_path):
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    words = "the quick brown fox jumps over a lazy dog while bytes pair and merge".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(30)) for i in range(400)]
    for name in ("jsonl", "txt", "parquet"):
        (tmp_path / name).mkdir()
    for f in range(4):
        part = docs[f * 100 : (f + 1) * 100]
        lines = "".join(json.dumps({"text": d}) + "\n" for d in part)
        (tmp_path / "jsonl" / f"part{f}.jsonl").write_text(lines)
        (tmp_path / "txt" / f"part{f}.txt").write_text("\n".join(part))
        pq.write_table(pa.table({"text": part}), tmp_path / "parquet" / f"part{f}.parquet")
    runs = 4
    done = subprocess.run(
        [sys.executable, "-c", _REPEAT, str(tmp_path), str(runs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.returncode, done.stdout[-500:], done.stderr[-2000:])
    assert done.stdout.count(" ok") == 3 * runs
    for fmt in ("json", "text", "parquet"):
        tok = build_tokenizer(str(tmp_path / f"tok-{fmt}-{runs - 1}"))
        assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
