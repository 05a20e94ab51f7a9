"""The input pipeline: streaming sources split by host (sources) → weighted mixture (mixture)
→ optional shuffle buffer (shuffle) → tokenizer (tokenizers) → packing (packing) → collator
(collators/), in data/pipeline.py, with a position that can be saved and restored exactly."""
