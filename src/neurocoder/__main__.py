"""``python -m neurocoder``: the same as the ``neurocoder`` command."""

from neurocoder.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
