"""The networks, plain torch modules with no Lightning: :class:`~rnnlm.network.config.RNNLMConfig` (every model
setting, checked), :class:`~rnnlm.network.lm.RNNLM` (Elman, ReLU, LSTM and GRU stacks, bidirectional as two
language models, AWD-LSTM regularisation, one-hot input, the adaptive softmax), the fused softmax head, the continuous
pointer for evaluation, and :class:`~rnnlm.network.classifier.Classifier`, the classifier built on an RNNLM encoder."""
