"""`python -m gpt.bench ...`, the same as `python -m gpt bench ...`."""

import sys

from gpt.bench import main

sys.exit(main())
