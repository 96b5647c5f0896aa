"""``python -m core.edits PATH [--model CHECKPOINT]``: list the directions a file or manifest provides;
``python -m core.edits fit-sparse CHECKPOINT``: fit sparse per-layer directions (core/edits/sparse.py)."""
import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["fit-sparse"]:
        from core.edits.sparse import main
        raise SystemExit(main(sys.argv[2:]))
    from core.edits.formats import main
    raise SystemExit(main())
