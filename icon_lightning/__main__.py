"""`python -m icon_lightning …` is the `icon` command (torchrun and tests start it this way)."""

from icon_lightning.entry import main

main()
