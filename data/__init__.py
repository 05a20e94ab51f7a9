"""The input pipeline: streaming sources split into logical shards (sources) → weighted
mixture (mixture) → optional shuffle buffer (shuffle) → tokenizer (tokenizers) → packing
(packing), one such stream a shard, interleaved into the host's rows of every global batch →
collator (collators/), in data/pipeline.py, with a position that can be saved and restored
exactly on any host count."""
