"""rnnlm: recurrent neural-network language models trained with PyTorch Lightning and truncated BPTT."""

__version__ = "0.1.0"

from rnnlm.config import RNNLMConfig  # noqa: E402
from rnnlm.inference import TrainedModel, load  # noqa: E402
from rnnlm.model import RNNLM  # noqa: E402

__all__ = ["RNNLM", "RNNLMConfig", "TrainedModel", "__version__", "load"]
