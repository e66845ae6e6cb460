"""``python -m cmscale.cli``: the ``cmscale`` command."""

import sys

from cmscale.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
