"""cl_vit: continual and long-tailed image classification with Vision Transformers.

Importing the package registers the suite's backbones with timm, so that
``timm.create_model("refiner_vit_tiny")`` and friends work afterwards. It also sets ``OMP_WAIT_POLICY=PASSIVE``
unless the environment names a policy (cl_vit.hardware.passive_openmp): it must precede the first import of torch;
and it defers wandb's code to its first use (timm imports it for a summary writer the suite never calls).
"""
from cl_vit.hardware import passive_openmp
from cl_vit.loading import defer_import

passive_openmp()
defer_import("wandb")

from cl_vit import models as _models  # noqa: E402,F401  (registers timm entry points)
from cl_vit.errors import UserError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
