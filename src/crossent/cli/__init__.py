"""The ``crossent`` command line (needs the ``cli`` extra: typer, rich, matplotlib).

``crossent tour`` walks through the article; ``crossent explain`` breaks one loss into its
terms; ``crossent quiz`` asks the article's questions; ``crossent plot`` draws a figure.
"""

from .app import app, main

__all__ = ["app", "main"]
