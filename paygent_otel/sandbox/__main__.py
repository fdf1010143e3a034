"""``python -m paygent_otel.sandbox``: run the sandbox in the foreground (see ``--help``)."""

import sys

from .cli import main

sys.exit(main())
