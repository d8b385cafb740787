"""`python -m debias` (what torchrun launches) is the `debias` CLI."""

from debias.cli import main

main()
