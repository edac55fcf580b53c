"""`python -m archplan ...`: the `archplan` command, for an environment whose scripts are not on PATH."""

from archplan.cli import main

if __name__ == "__main__":
    main()
