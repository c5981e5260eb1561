"""Training with Lightning: the LightningModules (:class:`~rnnlm.training.lm.LanguageModel` with its carried state,
:class:`~rnnlm.training.classifier.TextClassifier` with ULMFiT's layer groups and schedule), their callbacks, safe
and resumable checkpointing, W&B tracking, and the LightningCLI classes of ``rnnlm.fit`` and ``rnnlm.classify`` with
the training run they share."""
