"""fedmae: federated masked-autoencoder self pre-training for medical imaging."""

__version__ = "0.1.0"
