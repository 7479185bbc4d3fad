"""Federated pre-training and fine-tuning as plain PyTorch: what a site does in a round, and
how the server checks and stores what sites send. The Flower glue lives in ``sites/`` and
``server/`` and only moves these objects across the wire."""
