"""Real corpora: reading text, JSONL, Parquet and hub datasets, and tokenising them on every core."""
