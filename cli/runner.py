"""What the `conversion` and `jaxvlm` command lines share: run a subcommand so that an error
caused by input is one line on stderr and exit code 2 (`--debug` re-raises instead), and leave
without interpreter teardown after such an error."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

# CheckpointError is a ValueError; FloatingPointError is a diverged training run.
INPUT_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


def quiet_library_logs() -> None:
    """orbax and jax log through absl, from background threads too; a CLI error is one line."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("absl").setLevel(logging.CRITICAL)


def run(build_parser: Callable[[], argparse.ArgumentParser], argv=None) -> int:
    """Parse argv, run `args.func(args)`; input errors -> one line and 2, Ctrl-C -> 130."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if not args.debug:
        quiet_library_logs()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except INPUT_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def exit_with(code: int) -> None:
    """sys.exit, except after a reported input error: then leave without interpreter teardown,
    where orbax/tensorstore threads of an aborted save would print tracebacks into a closed
    event loop (partial checkpoint directories are ignored and replaced on the next save)."""
    if code == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
