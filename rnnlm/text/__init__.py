"""Text to token ids to batches, with no Lightning: data sources (the Hub, local files, save_to_disk folders) and
their splits, tokenizers at every level, encoding a split into the memory-mapped token cache, the contiguous streams
and truncated-BPTT chunks a language model reads, and the padded batches of similar length a classifier reads."""
