"""Golden-file comparison shared by the launcher tests."""

import os

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def check_golden(name: str, text: str, test_file: str) -> None:
  """Compares text with tests/golden/NAME; UPDATE_GOLDENS=1 rewrites it."""
  path = os.path.join(GOLDEN_DIR, name)
  if os.environ.get("UPDATE_GOLDENS") == "1":
    with open(path, "w") as f:
      f.write(text)
  with open(path) as f:
    assert text == f.read(), (f"{path} differs from the output; if the change is intended, "
                              f"regenerate with UPDATE_GOLDENS=1 pytest {test_file}")
