"""Run README.md's library quick start (its first ```python block) as a user would: in the
current directory, with whatever ``msr`` this interpreter imports. Used by the tests (the
repository's msr) and by scripts/wheel_check.sh (the built wheel, in a fresh environment)."""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start() -> str:
    """The code of the quick start: README's first python block."""
    found = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    if found is None:
        raise SystemExit(f"{README} has no ```python block")
    return found.group(1)


if __name__ == "__main__":
    exec(compile(quick_start(), f"{README} (quick start)", "exec"), {"__name__": "__quickstart__"})
    import msr

    print(f"the README quick start ran with msr {msr.__version__} from {msr.__file__}")
    sys.exit(0)
