"""The runner pod's entry point: `python -m modelpress.runner` runs the job in MODELPRESS_SPEC(_FILE)."""

import sys

from modelpress.runner.cli import main

sys.exit(main(sys.argv[1:] or ["run"]))
