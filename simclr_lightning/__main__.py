import sys

from simclr_lightning.cli import main

if __name__ == "__main__":
    sys.argv[0] = "simclr-lightning"  # the same command: its usage lines, not "__main__.py"
    main()
