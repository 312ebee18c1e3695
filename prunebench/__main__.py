"""`python -m prunebench ...` (and `torchrun ... -m prunebench ...`): the `prunebench` command."""

from .cli import main

main()
