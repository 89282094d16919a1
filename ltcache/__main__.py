"""``python -m ltcache``: the command line (also ``torchrun -m ltcache ...``)."""
from ltcache.cli import main

if __name__ == "__main__":
    main()
