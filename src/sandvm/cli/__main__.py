"""`python -m sandvm.cli`: the `sandvm` command."""

from sandvm.cli import main

main()
