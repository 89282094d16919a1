"""Stage-2 losses: one file per loss, each registered with :func:`register_loss`.

``LOSSES`` is the list (``ltcache methods`` shows which method uses which; docs/methods.md#losses
maps each loss to its method and source). Each file declares its hyper-parameters and builds its
:class:`LossSpec`; where a loss has a term of its own (a form, a shift, a modulation, an extra term) the term and its analytic
gradient live in the same file. ``_core.py`` holds the registry and the fused batched loss and
gradient; ``_fallback.py`` the autograd path of losses given only as a forward.

Every module of this package whose name does not start with ``_`` is imported here, so a new
loss is one new file (plus its method, one file in ``ltcache/stage2/methods/``).
"""
from __future__ import annotations

import importlib
import pkgutil

from ltcache.stage2.losses._core import (FORMS, LOSSES, TERMS, Form, LossBatch, LossSpec, LossTargets, LossUnit,
                                         Term, batched_loss, batched_loss_grad, build_loss, composable, get_loss,
                                         loss_signature, loss_targets, register_form, register_loss, register_term,
                                         stack_specs)

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_mod}")

from ltcache.stage2.losses.cb import class_balanced_weights  # noqa: E402
from ltcache.stage2.losses.grw import grw_weights  # noqa: E402
from ltcache.stage2.losses.lade import lade_regulariser  # noqa: E402
from ltcache.stage2.losses.las import label_aware_eps  # noqa: E402
from ltcache.stage2.losses.ldam import ldam_margins  # noqa: E402
from ltcache.stage2.losses.seesaw import SEESAW_EPS, seesaw_shift  # noqa: E402

__all__ = ["FORMS", "LOSSES", "TERMS", "Form", "LossBatch", "LossSpec", "LossTargets", "LossUnit", "Term",
           "batched_loss", "batched_loss_grad", "build_loss", "composable", "get_loss", "loss_signature", "loss_targets",
           "register_form", "register_loss", "register_term", "stack_specs", "class_balanced_weights",
           "grw_weights", "lade_regulariser", "label_aware_eps", "ldam_margins", "SEESAW_EPS", "seesaw_shift"]
