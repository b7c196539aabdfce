"""``python -m ccdrec``: the command line (as ``ccdrec``)."""

from ccdrec.cli import main

if __name__ == "__main__":
    main()
