"""What crossent teaches, kept apart from the library's core (where the loss is defined).

The core (``crossent.measures``, ``losses``, ``grad``...) defines and computes; this package
explains, and every number it shows is computed by the core:

* :mod:`~crossent.teaching.article`: the article's worked examples, in bits, nats, hartleys.
* :mod:`~crossent.teaching.curves`: the data of the figures and of ``crossent explain``'s
  term-by-term breakdowns (NumPy arrays from the core's functions).
* :mod:`~crossent.teaching.content`: the tour's content model (sections, worked examples,
  tables), shared by the terminal and the web page.
* :mod:`~crossent.teaching.tour`: the tour itself, the article's chain of ideas.
* :mod:`~crossent.teaching.formula`: formulas as text and as MathML.
* ``page/``: the web page's style sheet and script (the interactive figures).

The training experiment (:mod:`crossent.training`) is teaching code too. Nothing here imports
a plotting or terminal library; ``crossent.cli`` draws and prints.
"""
