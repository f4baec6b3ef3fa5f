"""``python -m mesh.cli``: the same as ``meshctl``."""

from mesh.cli import main

main()
