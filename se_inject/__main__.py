"""``python -m se_inject``: the same command line as ``se-inject``."""

from .cli import main

if __name__ == "__main__":
    main()
