"""The `refine-data` commands that live in their own modules, one module per group of commands.

`annotate` (annotate, batches, merge) and `publish` (card, push, validate, import-ecot, export) each
add their commands to the app with `register(app)`, called from `cli.py`; `batch` is what
`annotate --batch` and `batches` run.
"""
