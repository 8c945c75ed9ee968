"""cl_vit: continual and long-tailed image classification with Vision Transformers.

Importing the package registers the suite's backbones with timm, so that
``timm.create_model("refiner_vit_tiny")`` and friends work afterwards.
"""
from cl_vit import models as _models  # noqa: F401  (registers timm entry points)
from cl_vit.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
