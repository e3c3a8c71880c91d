"""`python -m jaxvlm`: an entry point only; the command line lives in `cli.main`."""

from cli.main import entry

entry()
