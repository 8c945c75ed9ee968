"""The backbone of a cl_vit run as a .safetensors file (weights only, no code), for ``model.checkpoint=FILE``.

    python scripts/export_backbone.py RUN_DIR/checkpoints/exp_000.pt weights/NAME.safetensors

Reads an experience checkpoint (``cl_vit.loading``: weights only), keeps the network's tensors (``net.*``, prefix
dropped) except its classifier, whose classes are the pre-training's, and writes them with a short provenance note in
the file's metadata (the source checkpoint's file name). Tensors are written contiguous, in the checkpoint's dtypes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def backbone_tensors(module_state: dict, head_prefix: str = "head.") -> dict:
    """``net.*`` tensors of a cl_vit module state, prefix dropped, classifier (``head.*``) left out."""
    net = {k[len("net."):]: v for k, v in module_state.items() if k.startswith("net.")}
    return {k: v.detach().contiguous() for k, v in net.items() if not k.startswith(head_prefix)}


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from cl_vit.loading import load_checkpoint

    p = argparse.ArgumentParser(prog="python scripts/export_backbone.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a run's checkpoints/exp_XXX.pt")
    p.add_argument("out", type=Path, help="the .safetensors file to write")
    a = p.parse_args(argv)
    state = load_checkpoint(a.checkpoint).get("module")
    if not isinstance(state, dict):
        print(f"error: {a.checkpoint} is not a cl_vit experience checkpoint (no 'module'): give "
              "RUN_DIR/checkpoints/exp_XXX.pt", file=sys.stderr)
        return 2
    tensors = backbone_tensors(state)
    save_file(tensors, str(a.out), metadata={"source": a.checkpoint.name})
    print(f"{a.out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
