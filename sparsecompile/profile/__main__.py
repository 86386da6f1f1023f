"""``python -m sparsecompile.profile``: the ``sparsecompile profile`` command on its own."""

import sys

from sparsecompile.profile.command import profile_command

if __name__ == "__main__":  # pragma: no cover
    sys.exit(profile_command())
