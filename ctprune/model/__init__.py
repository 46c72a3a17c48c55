"""The Transformer, its checkpoints (model folders) and decoding."""
