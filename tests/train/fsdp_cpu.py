"""Run `refinevla.train` under accelerate's FSDP on CPU processes (gloo), for the tests.

accelerate turns FSDP on only for GPU-like distributed types, although FSDP2 itself shards,
gathers and checkpoints on CPU tensors. This launcher (one per torchrun rank) lets accelerate
build its FSDP plugin from the same environment `accelerate launch --config_file fsdp.yaml`
exports (`fsdp_env` maps the shipped YAML), then, once the process group is up as MULTI_CPU,
switches the shared state to FSDP, exactly what the GPU path sets. Everything after that —
`prepare` (fully_shard, optimizer swap), `no_sync`, clipping, `get_state_dict`, sharded
`save_state` / `load_state` — is accelerate's and refine-train's unchanged production code.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any


def fsdp_env(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives each process for FSDP."""
    import yaml

    cfg = yaml.safe_load(config_file.read_text())
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_SYNC_MODULE_STATES": "true"}
    if cfg.get("mixed_precision"):
        env["ACCELERATE_MIXED_PRECISION"] = str(cfg["mixed_precision"])
    for key, value in (cfg.get("fsdp_config") or {}).items():
        name = "FSDP_TRANSFORMER_CLS_TO_WRAP" if key == "fsdp_transformer_layer_cls_to_wrap" else key.upper()
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _patch() -> None:
    import accelerate.state as st
    from accelerate.utils import DistributedType

    original = st.AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # re-read by every state
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    st.AcceleratorState.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    _patch()
    sys.argv = ["refinevla.train", *sys.argv[1:]]
    runpy.run_module("refinevla.train", run_name="__main__")
