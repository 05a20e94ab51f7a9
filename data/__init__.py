"""The input pipeline: streaming sources split by host → tokenizer → packing → batches."""
