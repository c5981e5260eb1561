"""The LightningDataModules: :class:`~rnnlm.data.lm.LMDataModule` serves a corpus as truncated-BPTT chunks,
:class:`~rnnlm.data.classifier.ClassificationDataModule` labelled texts in batches by length; both take the reading
settings of :class:`~rnnlm.data.reading.TextDataModule`. They sit above ``rnnlm.sharing`` because fine-tuning reads
the text with a pretrained model's tokenizer."""
