"""``python -m posttrain``: the same command line as the ``posttrain`` script (and for ``accelerate launch -m posttrain``)."""

from posttrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
