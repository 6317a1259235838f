"""`python -m droppos` (and so `torchrun -m droppos ...`) runs the CLI."""

from cli import main

if __name__ == "__main__":
    main()
