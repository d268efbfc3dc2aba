"""`python -m flows` runs the featurepipe CLI (same as the console script)."""

from flows.cli import main

main()
