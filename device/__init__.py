"""A person's device outside Flower rounds: the encrypted store, the device folder, the runtime loop, capture, audio stream."""
