"""The method, pure PyTorch: the network, its loss and anomaly map, backbones, checkpoints. No Ray here."""
