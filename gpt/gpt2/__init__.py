"""GPT-2 weights in (`model.init_from`) and out (`python -m gpt export`), in Hugging Face's format."""
