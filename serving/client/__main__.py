"""``python -m serving.client extract|summarize|translate ...`` without the full CLI."""

import sys

from .cli import main

sys.exit(main())
