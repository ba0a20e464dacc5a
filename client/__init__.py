"""The Flower ClientApp: train, evaluate, the device's data reader, DP-SGD and privacy budget, personal layers, SecAgg, the SuperNode launcher.

Nothing is imported here: Flower loads ``client.app``, which imports ``emofed.preload`` first.
"""
