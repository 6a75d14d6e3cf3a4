"""What a run leaves for people to read: results files, console tables, the report page.

Nothing in this package imports torch or Lightning, so ``python -m anomret.report`` starts quickly;
matplotlib is imported only when a figure is drawn.
"""
