"""``python -m crossent.cli``: the same as the ``crossent`` command."""

from . import main

if __name__ == "__main__":
    main()
