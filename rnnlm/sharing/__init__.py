"""A trained model outside the trainer, with no Lightning needed to use one: loading a language model
(:func:`~rnnlm.sharing.lm.load`, sampling) or a classifier (:func:`~rnnlm.sharing.classifier.load`, predictions)
from a checkpoint, an exported folder or a Hub id; the checkpoint record; the exported folder; the Hub; moving
pretrained weights into a model to fine-tune; the model card; and export itself."""
