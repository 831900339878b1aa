"""`python -m cgan_pipe` is the `cgan-pipe` command."""

from .cli import main

main()
