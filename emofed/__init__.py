"""emofed: the command line and the typed configuration shared by every package."""
