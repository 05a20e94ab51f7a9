"""Train a byte-level BPE tokenizer and save it as an HF tokenizer folder for data.tokenizer.

    python -m tools.train_tokenizer --corpus stdlib --vocab-size 8192 --out tokenizers/stdlib8k
    python -m tools.train_tokenizer --corpus '/data/web/*.jsonl' --format json --vocab-size 32000 \\
        --out tokenizers/web32k --max-bytes 2000000000

The folder holds tokenizer.json (the `tokenizers` library's format), tokenizer_config.json and
special_tokens_map.json naming BOS, EOS and pad, so both this project
(data.tokenizer=tokenizers/stdlib8k) and transformers' AutoTokenizer load it.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from data.config import SourceConfig
from data.sources import host_texts
from torchprime.errors import ConfigError

log = logging.getLogger("train_tokenizer")

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
#: the 256 byte symbols plus the special tokens: the smallest vocabulary that can work
MIN_VOCAB = 256 + 3


def corpus_texts(corpus: str, fmt: str = "text", text_field: str = "text") -> Iterator[str]:
    """The documents of `stdlib` (the default corpus) or of local files at a path or glob."""
    if corpus == "stdlib":
        spec = SourceConfig(source="stdlib")
    else:
        spec = SourceConfig(source="files", path=corpus, format=fmt, text_field=text_field)
    return host_texts(spec, 0, 1, key="--corpus")


def limit_bytes(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Documents until about `max_bytes` of text (UTF-8) have been given."""
    seen = 0
    for text in texts:
        if max_bytes is not None and seen >= max_bytes:
            return
        seen += len(text.encode("utf-8"))
        yield text


class ReadAhead:
    """Documents read on a thread of our own and handed over in batches of plain strings.

    `tokenizers` drives the iterator given to `train_from_iterator` from its rayon worker
    threads (BpeTrainer.feed bridges it into a parallel iterator), each taking the GIL through
    a thread state made for that one refill. Run there, the `datasets` stream's generators end
    on such a thread and drop the last reference to the IterableDataset, whose `_epoch` is a
    shared-memory torch tensor; torch frees it under pybind11's own GIL guard, which deletes a
    thread state that is not the current one: a segmentation fault in about one run of three.
    Here every `datasets` object is made, read and freed on the reading thread, and the worker
    threads only take lists of str from a queue. The queue is bounded, so the corpus is still
    streamed. An error while reading ends the batches and is raised by `raise_error`, in the
    caller's thread, after training returns (never through the tokenizers library).
    """

    _END = None

    def __init__(self, texts: Iterable[str], batch: int = 256, depth: int = 8):
        self._queue: queue.Queue[list[str] | None] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._read, args=(texts, batch), name="corpus-reader", daemon=True
        )
        self._thread.start()

    def _put(self, item: list[str] | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, texts: Iterable[str], batch: int) -> None:
        try:
            chunk: list[str] = []
            for text in texts:
                chunk.append(text)
                if len(chunk) == batch:
                    if not self._put(chunk):
                        return
                    chunk = []
            if chunk:
                self._put(chunk)
        except BaseException as e:  # raised again by raise_error, in the caller's thread
            self._error = e
        finally:
            del texts  # the generators (and the datasets objects) are freed on this thread
            self._put(self._END)

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> list[str]:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(self._END)  # every later call ends too
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the reader (if training ended early) and wait for it."""
        self._stop.set()
        self._thread.join()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path, min_frequency: int = 2) -> Path:
    """Train byte-level BPE on `texts` and write the tokenizer folder `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ConfigError(
            f"--vocab-size {vocab_size}: at least {MIN_VOCAB} (256 bytes and 3 special tokens)."
        )
    tok = Tokenizer(models.BPE())
    # Byte-level: any text maps to the 256 byte symbols first, so nothing is ever unknown and
    # decoding gives the text back exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    batches = ReadAhead(texts)
    try:
        tok.train_from_iterator(batches, trainer)
    finally:
        batches.close()
    batches.raise_error()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {**specials, "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.train_tokenizer", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--corpus", required=True, help="stdlib, or local files: a file, folder or glob"
    )
    parser.add_argument(
        "--format", default="text", help="text (one document a file), json or parquet"
    )
    parser.add_argument(
        "--text-field", default="text", help="field holding the text (json, parquet)"
    )
    parser.add_argument(
        "--vocab-size", type=int, required=True, help="tokens, special ones included"
    )
    parser.add_argument("--out", type=Path, required=True, help="the tokenizer folder to write")
    parser.add_argument("--max-bytes", type=int, default=None, help="train on about this much text")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="merges seen fewer times are not learned"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        texts = limit_bytes(corpus_texts(args.corpus, args.format, args.text_field), args.max_bytes)
        out = train_bpe(texts, args.vocab_size, args.out, args.min_frequency)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    log.info("tokenizer: %s written in %.1f s (data.tokenizer=%s)", out, elapsed, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
