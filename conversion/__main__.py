"""`python -m conversion`: an entry point only; the command line lives in `cli.convert`."""

from cli.convert import entry

entry()
