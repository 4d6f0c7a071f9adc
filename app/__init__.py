"""CharRNN HTTP service: validation -> scheduler (queue + batcher) -> model backend."""
