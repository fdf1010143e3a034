"""``python -m paygent_otel.sandbox``: run the sandbox in the foreground (see ``--help``)."""

import sys

from paygent_otel._cli.sandbox import main

sys.exit(main())
