"""`python -m cv_assets.cli` is the `cv-assets` command."""

import sys

from cv_assets.cli import main

sys.exit(main())
