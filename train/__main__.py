"""`python -m refinevla.train ...` is `refine-train ...` (so `accelerate launch -m refinevla.train` works)."""

from .cli import main

if __name__ == "__main__":
    main()
