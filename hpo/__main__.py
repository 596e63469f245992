import sys

from hpo.cli import main

# Guarded: worker trainer processes are started with multiprocessing's spawn method, which
# imports the parent's __main__ module (as __mp_main__) in the child.
if __name__ == "__main__":
    sys.exit(main())
