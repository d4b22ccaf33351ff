"""GPT-2 weights in (`train.init_from`) and out (`python -m gpt export`), in Hugging Face's format."""
