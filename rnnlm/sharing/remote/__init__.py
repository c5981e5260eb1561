"""Code that an exported folder carries for people without rnnlm: ``modeling_rnnlm.py`` is copied as is into every
folder ``rnnlm.export`` writes, where ``transformers`` imports it (``trust_remote_code=True``). rnnlm itself never
imports these modules: they need ``transformers``, which rnnlm does not depend on, and they import nothing of
rnnlm, so that the copy works on its own."""
