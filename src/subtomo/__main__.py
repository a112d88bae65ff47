"""Allow ``python -m subtomo``."""

from subtomo.cli.main import main

if __name__ == "__main__":
    main()
