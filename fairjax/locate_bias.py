"""``python -m fairjax.locate_bias --model M --out DIR``: the locate-then-fix analysis of a VILA-U model
(:mod:`fairjax.analysis.locate`)."""

import sys

from fairjax.analysis.locate import locate_bias, main

__all__ = ["locate_bias", "main"]

if __name__ == "__main__":
    sys.exit(main())
