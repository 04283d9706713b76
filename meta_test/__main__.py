"""``python -m meta_test``."""

import sys

from meta_test.cli import main

sys.exit(main())
