"""Shared test fixtures: real parts built inside the tests (SentencePiece models, tiny checkpoints)."""
