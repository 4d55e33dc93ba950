"""Run the reproduction study: ``python -m benchmarks.study --help``.

See :mod:`benchmarks.study_common` for how runs are scheduled and stored, and each
``benchmarks/study_<name>.py`` for what a part of the study runs and which claim it checks.
"""

from benchmarks.study_common import main

if __name__ == "__main__":
    main()
