"""`python -m prunebench ...` (and `torchrun ... -m prunebench ...`): the `prunebench` command."""

from .run import main

main()
