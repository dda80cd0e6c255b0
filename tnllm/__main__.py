"""``python -m tnllm``: the same as the ``tnllm`` command."""
from .cli import main

raise SystemExit(main())
