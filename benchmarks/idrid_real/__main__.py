"""`python -m benchmarks.idrid_real ...`: see `benchmarks.idrid_real.cli`."""

from benchmarks.idrid_real.cli import main

if __name__ == "__main__":
    main()
