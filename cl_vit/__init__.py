"""cl_vit: continual and long-tailed image classification with Vision Transformers.

Importing the package registers the suite's backbones with timm, so that
``timm.create_model("refiner_vit_tiny")`` and friends work afterwards. It also sets ``OMP_WAIT_POLICY=PASSIVE``
unless the environment names a policy (cl_vit.hardware.passive_openmp): it must precede the first import of torch.
timm is imported with its import of wandb deferred (loading.import_deferring): its summary writer, which the suite never
calls, gets wandb at first use. wandb is never left deferred in ``sys.modules`` (loading.defer_import): its own code
reads ``wandb.sdk.data_types`` through the package, and a stand-in there let a run with logger=wandb fail depending on
import order (docs/scale.md).
"""
from cl_vit.hardware import passive_openmp
from cl_vit.loading import gc_paused, import_deferring

passive_openmp()
with gc_paused():  # torch and timm: ~0.5 s of full collections otherwise
    import_deferring("timm", "wandb")
    from cl_vit import models as _models  # noqa: E402,F401  (registers timm entry points)
from cl_vit.errors import UserError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
