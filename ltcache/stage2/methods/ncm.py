"""``ncm``: nearest class mean on normalised features, a closed form (docs/methods.md#ncm)."""
from __future__ import annotations

from ltcache.stage2.methods import CLOSED_FORM_GAP, register_method

register_method("ncm", head="ncm", loss="-", closed_form=True, presets={},
                source="cRT KNNClassifier.py cl2n + l2 (docs/methods.md#ncm)",
                notes="no head trained or read: centroids from the clean train view",
                feature_sets={"*": "bn-eval"}, cache_gap=CLOSED_FORM_GAP)
