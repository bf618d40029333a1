"""`python -m lmline.cli`: what launch_distributed starts once per device."""

from lmline.cli import main

main()
