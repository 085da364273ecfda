"""`python -m kleave` is the `kleave` command."""

from kleave.cli import main

main()
