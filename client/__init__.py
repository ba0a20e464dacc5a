"""The Flower ClientApp: train, evaluate, data reader, DP-SGD and the privacy budget, personal layers, SecAgg, SuperNode launcher.

Nothing is imported here: Flower loads ``client.app``, which imports ``emofed.preload`` first.
"""
