"""Publishing a reasoning dataset: Hub push, validation, Embodied-CoT import, LeRobot export.

Each module is imported by the command that needs it, so `refine-data --help` stays instant.
"""
