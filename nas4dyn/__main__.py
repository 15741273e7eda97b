"""`python -m nas4dyn` (also what `torchrun -m nas4dyn train ...` runs)."""
from nas4dyn.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
