"""``python -m fa_hvd.bench``: ``fa-hvd-bench`` where its console script is not installed."""

import sys

from .cli import main

sys.exit(main())
