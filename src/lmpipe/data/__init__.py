"""Data: sources -> records -> mixture -> tokenizer -> token shards -> samplers.

Nothing in this package knows about models or stages.
"""
