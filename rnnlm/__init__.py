"""rnnlm: recurrent neural-network language models trained with PyTorch Lightning and truncated BPTT.

    import rnnlm
    lm = rnnlm.load("runs/.../checkpoints/last.ckpt")   # or an exported folder, or a Hub id OWNER/NAME
    print(lm.sample("The", max_new_tokens=100, temperature=0.7))

The package is in layers; a module imports only from its own layer or those below it (``lint-imports`` checks
the contract in pyproject.toml). Two stacks run through the layers side by side, one module each:

    layer           what it holds                                language model        text classifier
    commands        the faces users call (python -m rnnlm.X)     fit, generate,        classify, embed
                                                                 evaluate, score
                                                                 export (both)
    training        LightningModules, the CLI classes, the       training.lm           training.classifier
                    shared training run, callbacks,              (LanguageModel)       (TextClassifier)
                    checkpointing, tracking, ULMFiT's schedule
    sharing         a trained model outside the trainer: load,   sharing.lm            sharing.classifier
                    checkpoint records, exported folders, the    (TrainedModel, load)  (TrainedClassifier, load)
                    Hub, weight transfer, model cards, export
    data | network  data: sources, tokenizers, the token cache,  data.lm               data.classifier
                    streams, batching, the data modules;         (LMDataModule)        (ClassificationDataModule)
                    network: config, RNN, fused head, pointer    network.lm (RNNLM)    network.classifier
                    (plain torch, no Lightning)                                        (Classifier)
    base            errors, files (atomic writes, safe reads), cpu, version,
                    commands (what the command faces share: --device, input lines)

``data`` and ``network`` know nothing of each other; the two stacks meet only where the classifier is built on
the language model (its network is an RNNLM encoder, it is fine-tuned from a trained LM).
"""

from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.sharing.lm import TrainedModel, load
from rnnlm.version import __version__

__all__ = ["RNNLM", "RNNLMConfig", "TrainedModel", "__version__", "load"]
