"""`python -m refinevla.evaluate ...` is `refine-eval ...`."""

from .cli import main

if __name__ == "__main__":
    main()
