"""`python -m grpo_app ...` = the `grpo` command."""

import sys

from grpo_app.cli import main

sys.exit(main())
