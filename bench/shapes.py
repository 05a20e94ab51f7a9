"""The model and batch shapes the side-by-side benchmarks share (bench.hf_compare, bench.mfu)."""

#: The reference shapes of the comparison with HF transformers.
SHAPES = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
)
BATCH, SEQ = 4, 256
