"""``python -m attnkit ...`` runs the command line (see :mod:`attnkit.cli`)."""

from attnkit.cli import main

if __name__ == "__main__":
    main()
