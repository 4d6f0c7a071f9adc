class TrainingError(Exception):
    """A problem with the data, settings or output location, reported as one line."""
