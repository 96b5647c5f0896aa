"""``python -m core.edits PATH [--model CHECKPOINT]``: list the directions a file or manifest provides."""
from core.edits.formats import main

if __name__ == "__main__":
    raise SystemExit(main())
