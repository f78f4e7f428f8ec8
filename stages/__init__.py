"""Build stages: readers, decode/resize, captioner, annotators, shard writer."""
