"""``python -m pixeldit``: the ``pixeldit`` command."""

from pixeldit.cli import main

if __name__ == "__main__":
    main()
