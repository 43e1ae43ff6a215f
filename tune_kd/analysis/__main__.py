"""`python -m tune_kd.analysis EXPERIMENT_DIR`: the command line of `tune_kd.analysis.report`."""

import sys

from tune_kd.analysis import main

sys.exit(main())
