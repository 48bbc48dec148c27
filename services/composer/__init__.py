"""poe.v1.Composer: train-free composition of models from a pool in the registry."""
