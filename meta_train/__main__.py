"""``python -m meta_train`` (see ``meta_train.cli``)."""

import sys

from meta_train.cli import main

sys.exit(main())
