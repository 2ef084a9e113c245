"""`python -m dalipipe ...` (and `torchrun -m dalipipe train ...`) run the CLI."""

from dalipipe.cli import main

if __name__ == "__main__":
    main()
