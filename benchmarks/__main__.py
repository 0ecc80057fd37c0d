"""``python -m benchmarks``: same as ``qwen-serve bench``."""

import sys

from .cli import main

sys.exit(main())
