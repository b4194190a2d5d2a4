"""A Whisper and how it runs: loading (loading, token_layout, lora, tiny), its inputs (features, encoder_window),
its decoding (decoding, decoding_options), its loss (loss) and sharded engines (sharding)."""
