"""`python -m refinevla.annotate ...` is `refine-data ...` (the same for all three CLIs, so a script can run
them with its own interpreter, whatever is on PATH)."""

from .cli import main

if __name__ == "__main__":
    main()
