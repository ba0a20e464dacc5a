"""`python -m cli`: the `emofed` command."""

import sys

from cli.main import main

sys.exit(main())
