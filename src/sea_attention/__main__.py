"""``python -m sea_attention``: the ``sea`` command (also how torchrun launches it)."""

from .app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
