"""rnnlm: recurrent neural-network language models trained with PyTorch Lightning and truncated BPTT.

    import rnnlm
    lm = rnnlm.load("runs/.../checkpoints/last.ckpt")   # or an exported folder, or a Hub id OWNER/NAME
    print(lm.sample("The", max_new_tokens=100, temperature=0.7))

The package is in layers; a module imports only from its own layer or those below it (``lint-imports`` checks
the contract in pyproject.toml). Two stacks run through the layers side by side, one module each:

    layer     what it holds                                     language model         text classifier
    commands  the faces users call (python -m rnnlm.X)          fit, generate,         classify, embed
                                                                evaluate, score        (export: both)
    training  LightningModules, the CLI classes and the         training.lm            training.classifier
              training run they share, callbacks, checkpoint-   (LanguageModel)        (TextClassifier)
              ing, tracking, ULMFiT's schedule
    data      the LightningDataModules and the reading          data.lm                data.classifier
              settings they share                               (LMDataModule)         (ClassificationDataModule)
    sharing   a trained model outside the trainer: load,        sharing.lm             sharing.classifier
              checkpoint records, exported folders, the Hub,    (TrainedModel, load)   (TrainedClassifier, load)
              weight transfer, model cards, export
    text      sources, tokenizers, encoding, the token cache,   text.streams           text.batching
              streams, batching (no Lightning)
    network   config, RNN, fused head, pointer, the classifier  network.lm (RNNLM)     network.classifier
              on an LM encoder (plain torch), their                                    (Classifier)
              from_pretrained / save_pretrained (pretrained)
    base      errors, files (atomic writes, safe reads), cpu, version, commands (what the faces share)

``text`` and ``network`` know nothing of each other. The data modules sit above sharing because fine-tuning reads
a pretrained model's tokenizer. The two stacks meet only where the classifier is built on the language model (its
network is an RNNLM encoder, fine-tuned from a trained LM); elsewhere the contract keeps each pair independent.
"""

from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.sharing.lm import TrainedModel, load
from rnnlm.version import __version__

__all__ = ["RNNLM", "RNNLMConfig", "TrainedModel", "__version__", "load"]
