"""Offline training CLI for CharRNN checkpoints (``python -m training``)."""
