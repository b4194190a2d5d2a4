"""Utterances from their sources to training batches: reading (sources, audio), preparing and caching rows
(prepare, rows, cache_files), the run's splits (splits), extra rows (mixing, no_speech, timestamp_labels), and
batching (samplers, loaders, collator, augment)."""
