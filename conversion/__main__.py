from conversion.cli_support import exit_with

from .cli import main

exit_with(main())
