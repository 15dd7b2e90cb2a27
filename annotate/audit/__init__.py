"""`refine-data audit`: what an annotated output's rationales are worth, measured.

Against the episode's own motion everywhere (subtask boundaries at gripper events, the instruction's
objects named, boilerplate repeated across episodes, boxes over most of the image, answers and cost),
and against the simulator's ground truth where the source is `refine-eval demos` (`schemas.truth`:
object boxes on the first frame, the expert's phase boundaries, grasp and release steps, objects that
are not in the scene). The audit reads; it never changes a dataset.

```python
from refinevla.annotate.audit import audit_output, write_report

result = audit_output("runs/carrot", truth=Path("demos/carrot"))
result.summary["event_recall"], result.summary["box_iou_mean"]   # pooled numbers (None: not measured)
result.episodes[0]                                                 # the worst episode's EpisodeAudit
write_report(result)                                               # audit.md, audit.json, episodes.parquet
```

Modules: `metrics` (pure arithmetic), `names` (object-name matching), `read` (the output, its store,
the truth), `score` (one episode, the summary), `run` (`audit_output`), `report` (files and tables).
"""

from __future__ import annotations

from .read import AnnotatedOutput, read_output
from .report import ReportFiles, default_report_dir, print_tables, write_report
from .run import DEFAULT_TOLERANCE, AuditResult, audit_output
from .score import EpisodeAudit

__all__ = [
    "DEFAULT_TOLERANCE",
    "AnnotatedOutput",
    "AuditResult",
    "EpisodeAudit",
    "ReportFiles",
    "audit_output",
    "default_report_dir",
    "print_tables",
    "read_output",
    "write_report",
]
