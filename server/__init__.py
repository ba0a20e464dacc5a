"""The coordinator: Flower ServerApp, strategy assembly, user-level DP, run directory and reports.

Nothing is imported here: Flower loads ``server.app``, which imports ``emofed.preload`` first.
"""
