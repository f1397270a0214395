"""`python -m quantize`: the same as the `quantize` command."""

from .cli import main

raise SystemExit(main())
