"""``python -m lyoncompress``: the command line, also what ``torchrun -m lyoncompress`` starts."""

from lyoncompress.cli import main

main()
