"""The `emofed` command line: one module per journey, sharing `cli.common`."""
