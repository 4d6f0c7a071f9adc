"""CharRNN core: the network, vocabulary, checkpoint format and sampling shared by
the training CLI and the HTTP service."""

from charrnn.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from charrnn.model import CharRNN, ModelConfig
from charrnn.sampling import SamplingParams, sample_next
from charrnn.vocab import UnknownCharactersError, Vocabulary

__all__ = [
    "CharRNN",
    "Checkpoint",
    "CheckpointError",
    "ModelConfig",
    "SamplingParams",
    "UnknownCharactersError",
    "Vocabulary",
    "load_checkpoint",
    "sample_next",
    "save_checkpoint",
]
