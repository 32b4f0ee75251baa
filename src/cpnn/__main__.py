"""``python -m cpnn``: the same command line as the ``cpnn`` script."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
