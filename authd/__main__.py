"""``python -m authd`` runs the CLI."""

from authd.cli import main

main()
