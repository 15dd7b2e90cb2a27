"""LIBERO's suite names, light enough for the report and the command line (no simulator imported here)."""

from __future__ import annotations

LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
LIBERO_STANDARD = LIBERO_SUITES[:4]  # the four-suite table papers print (libero_10 = LIBERO-Long)
LIBERO_TASKS = {"libero_90": 90}  # tasks per suite; the others have 10
# LIBERO-PRO's perturbations of a standard suite (its suites `<base>_<perturbation>`): swapped initial
# positions, other objects, paraphrased instructions, other tasks, other environments
LIBERO_PRO_PERTURBATIONS = ("swap", "object", "lan", "task", "env")
LIBERO_PRO_SUITES = tuple(f"{b}_{p}" for b in LIBERO_STANDARD for p in LIBERO_PRO_PERTURBATIONS)


def libero_base(suite: str) -> str | None:
    """The LIBERO suite `suite` is or perturbs (libero_spatial_swap -> libero_spatial); None if no LIBERO one."""
    if suite in LIBERO_SUITES:
        return suite
    return suite.rsplit("_", 1)[0] if suite in LIBERO_PRO_SUITES else None
