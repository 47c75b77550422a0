"""`python -m hparray`: the same as the `hparray` command."""

from hparray.cli import main

main()
