"""refinevla.annotate: episode sources, motion primitives, statistics, teachers, the
annotation engine and the `refine-data` CLI.

Nothing heavy is imported here, so `refine-data --help` stays instant.
"""
