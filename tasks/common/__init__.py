"""Helpers shared by the task adapters: reading and checking the files of a real data set (files.py) and
checking a tokenizer against the model's embedding (tokenizers.py)."""
