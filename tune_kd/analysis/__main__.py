"""`python -m tune_kd.analysis EXPERIMENT_DIR`: see the package's docstring."""

import sys

from tune_kd.analysis import main

sys.exit(main())
