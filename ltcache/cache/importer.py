"""``ltcache import``: a verified cache from features you already have (no backbone run).

Key convention (the arrays may sit in one file or be spread over several, merged by name):

  ==================  ===========================  =================================================
  key                 shape                        meaning
  ==================  ===========================  =================================================
  train_features      [N, D] or [N, V, D] float    training features; V views: "clean", "aug1", ...
                                                   (view 0 is the clean, un-augmented one)
  train_labels        [N] int in [0, K)            class of each row
  test_features       [N, D] or [N, V, D] float    V <= 2 views: "center", "hflip"
  test_labels         [N] int
  val_features        (optional) as test           a held-out split for val-based choices
  val_labels          (optional)
  <split>_index       (optional) [N] int           each row's id in your own data (default 0..N-1)
  weight, bias        (optional) [K, D], [K]       the stage-1 classifier (or --classifier FILE)
  class_names         (optional) [K] str           class names (default "0" .. "K-1")
  ==================  ===========================  =================================================

Nested containers are flattened with ``_``: a ``.pt`` dict ``{"train": {"features": ..., "labels":
...}}`` or an HDF5 group ``train/features`` is ``train_features``. Formats: ``.npz`` (np.savez),
``.pt`` / ``.pth`` (torch.save of a dict of tensors), ``.npy`` (one array, named by the file name:
``train_features.npy``), a folder of ``.npy`` files, ``.h5`` / ``.hdf5`` (datasets).

K is the classifier's row count when one is given, else the length of ``class_names``, else the
largest label + 1. The class counts (and Many / Medium / Few) come from the train labels. Without a
classifier, ``fit_classifier=True`` fits a plain cross-entropy linear head on the train features;
without either, the cache records that it has no stage-1 classifier and the stage-2 methods that
start from one are refused (:mod:`ltcache.stage2.requirements`).

The cache is written into a temporary folder beside ``out``, loaded back and verified, and only
then renamed to ``out``: bad input leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ltcache.cache.build import DTYPES, manifest_body
from ltcache.cache.manifest import CLASSIFIER, MANIFEST, sha256_file, write_manifest
from ltcache.cache.shards import shard_name, write_classifier, write_shard
from ltcache.errors import LtcacheError, close_matches, os_error
from ltcache.outputs import output_lock, restore_interrupted_swap

PathLike = Union[str, Path]

SPLITS = ("train", "test", "val")
REQUIRED = ("train", "test")
TEST_VIEW_NAMES = ("center", "hflip")
FORMATS = ".npz, .pt/.pth, .npy (or a folder of them), .h5/.hdf5"
KEY_CONVENTION = ("train_features [N,D] or [N,V,D] + train_labels [N]; test_features + test_labels; optional "
                  "val_features + val_labels, <split>_index, weight [K,D] + bias [K], class_names [K]; nested "
                  "containers flattened with '_' (train/features = train_features)")
KNOWN = tuple(f"{s}_{f}" for s in SPLITS for f in ("features", "labels", "index")) + ("weight", "bias", "class_names")
STAGE1_KEY = "stage1_classifier"        # manifest block: where the stage-1 classifier came from
FIT_WD = 5e-4
FIT_MAX_ITER = 200


# ---------------------------------------------------------------------------------------------
# reading the user's files
# ---------------------------------------------------------------------------------------------

def _flatten(obj, prefix: str, out: dict, path: Path) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}_{k}" if prefix else str(k), out, path)
        return
    if torch.is_tensor(obj):
        obj = obj.detach().cpu()
        obj = (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()
    elif isinstance(obj, (list, tuple)) and all(isinstance(s, str) for s in obj):
        obj = np.asarray(obj, dtype=str)
    elif not isinstance(obj, np.ndarray):
        raise LtcacheError(f"{path}: entry '{prefix}' is a {type(obj).__name__}, not an array; store tensors or "
                           f"arrays under the keys {', '.join(KNOWN[:2])}, ... (see `ltcache import --help`)")
    out[prefix] = obj


def read_arrays(path: PathLike) -> dict[str, np.ndarray]:
    """The named arrays of one file (or a folder of ``.npy`` files), by the key convention's names;
    an unreadable file or an unknown format is a one-line LtcacheError."""
    path = Path(path)
    if not path.exists():
        raise LtcacheError(f"{path} not found; give a features file ({FORMATS})")
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise LtcacheError(f"{path} is a folder without .npy files; save one array per file, e.g. "
                               "train_features.npy, train_labels.npy, test_features.npy, test_labels.npy")
        out: dict = {}
        for f in files:
            out.update(read_arrays(f))
        return out
    suffix = path.suffix.lower()
    out = {}
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                for k in z.files:
                    out[k] = z[k]
        elif suffix == ".npy":
            out[path.stem] = np.load(path, allow_pickle=False)
        elif suffix in (".pt", ".pth"):
            obj = _torch_load(path)
            if not isinstance(obj, dict):
                raise LtcacheError(f"{path} holds a {type(obj).__name__}, not a dict of tensors; save "
                                   "{'train_features': ..., 'train_labels': ..., ...} with torch.save")
            _flatten(obj, "", out, path)
        elif suffix in (".h5", ".hdf5"):
            import h5py
            with h5py.File(path, "r") as f:
                def visit(name, node):
                    if isinstance(node, h5py.Dataset):
                        data = node[()]
                        if data.dtype.kind in "SO":
                            data = np.asarray([d.decode() if isinstance(d, bytes) else str(d) for d in data])
                        out[name.replace("/", "_")] = np.asarray(data)
                f.visititems(visit)
        else:
            raise LtcacheError(f"{path}: unknown format '{path.suffix or '(no suffix)'}'; use {FORMATS}")
    except LtcacheError:
        raise
    except Exception as exc:
        raise LtcacheError(f"{path} is not a readable {suffix} file ({exc.__class__.__name__}); check that it "
                           "is complete and of the format its suffix says") from None
    return out


_PT_EXPECTED = ("expected a dict of tensors written by torch.save, e.g. torch.save({'train_features': F, "
                "'train_labels': y, ...}, FILE), or use .npz")


def _found(head: bytes) -> str:
    """What the first bytes of a file that is not a torch.save archive look like."""
    if not head:
        return "an empty file"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return f"text starting {head.decode('ascii', 'replace')[:24]!r}"
    return f"other binary data starting {head[:8].hex(' ')}"


def _torch_load(path: Path):
    """``torch.load(weights_only=True)`` of a features file; what was found instead of a torch.save
    file of tensors is named in a one-line LtcacheError (never unpickles arbitrary objects)."""
    import re
    import warnings
    try:
        with path.open("rb") as fh:
            head = fh.read(32)
    except OSError as exc:
        raise LtcacheError(f"{path} cannot be read ({exc.strerror or exc})") from None
    zipped, pickled = head.startswith(b"PK\x03\x04"), head[:1] == b"\x80"
    if not (zipped or pickled):
        raise LtcacheError(f"{path} is not a torch.save file: found {_found(head)}, not a zip archive or a "
                           f"pickle; {_PT_EXPECTED}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # torch's pickle-protocol warnings
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:                               # never unpickled unsafely
        text = str(exc)
        glob = re.search(r"GLOBAL ([\w.]+)", text)
        if glob:
            raise LtcacheError(f"{path} holds objects other than tensors (found {glob.group(1)}); save a dict of "
                               "torch tensors (torch.from_numpy(a)) or use .npz") from None
        if zipped:
            what = f"a damaged or truncated torch.save archive ({_line(exc)})"
        else:
            what = "a pickle that torch.save did not write (or a damaged one)"
        raise LtcacheError(f"{path} is not a readable torch.save file: found {what}; {_PT_EXPECTED}") from None


def _line(exc: BaseException) -> str:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:80]}" if first else type(exc).__name__


def _merge(paths: Sequence[Path]) -> tuple[dict, dict]:
    """All arrays of the source files, and the file each key came from."""
    arrays, origin = {}, {}
    for p in paths:
        for k, v in read_arrays(p).items():
            if k in arrays:
                raise LtcacheError(f"key '{k}' is in both {origin[k]} and {p}; keep one of them")
            arrays[k], origin[k] = v, p
    unknown = [k for k in arrays if k not in KNOWN]
    if unknown:
        k = unknown[0]
        close = close_matches(k, KNOWN, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise LtcacheError(f"{origin[k]}: unknown key '{k}'{hint}; expected {KEY_CONVENTION}")
    return arrays, origin


def read_classifier(path: PathLike, feature_dim: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(weight [K, D], bias [K] or None) of a classifier file: keys ``weight``/``bias``, or a state
    dict with exactly one 2-D ``*.weight`` of D columns (and its ``*.bias``)."""
    path = Path(path)
    arrays = read_arrays(path)
    if "weight" in arrays:
        return arrays["weight"], arrays.get("bias")
    cands = [k for k, v in arrays.items() if k.endswith(".weight") and v.ndim == 2 and v.shape[1] == feature_dim]
    if len(cands) != 1:
        found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(arrays.items())[:6])
        raise LtcacheError(f"--classifier {path}: no 'weight' [K, {feature_dim}] (found {found or 'nothing'}); save "
                           "{'weight': W, 'bias': b} with W [K, D], b [K]")
    return arrays[cands[0]], arrays.get(cands[0][:-len("weight")] + "bias")


# ---------------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------------

def _split_arrays(arrays: dict, origin: dict, split: str) -> Optional[tuple]:
    f_key, y_key, i_key = f"{split}_features", f"{split}_labels", f"{split}_index"
    if f_key not in arrays and y_key not in arrays:
        if split in REQUIRED:
            raise LtcacheError(f"the {split} split is missing: no '{f_key}' / '{y_key}' in "
                               f"{', '.join(sorted({str(p) for p in origin.values()}))}; expected {KEY_CONVENTION}")
        if i_key in arrays:
            raise LtcacheError(f"{origin[i_key]}: '{i_key}' without '{f_key}' / '{y_key}'; add the split or drop the key")
        return None
    for key in (f_key, y_key):
        if key not in arrays:
            other = y_key if key == f_key else f_key
            raise LtcacheError(f"{origin[other]} has '{other}' but no '{key}'; give both for the {split} split")
    f, y = arrays[f_key], arrays[y_key]
    where = origin[f_key]
    if f.dtype.kind != "f" or f.ndim not in (2, 3):
        raise LtcacheError(f"{where}: '{f_key}' is {f.dtype} {tuple(f.shape)}; it must be floating point [N, D] or "
                           "[N, V, D]")
    f = f[:, None, :] if f.ndim == 2 else f
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise LtcacheError(f"{origin[y_key]}: '{y_key}' is {y.dtype} {tuple(y.shape)}; it must be a 1-D integer "
                           "array of class indices (e.g. labels.astype(np.int64))")
    if len(f) != len(y):
        raise LtcacheError(f"{where}: '{f_key}' has {len(f)} rows but '{y_key}' has {len(y)}; give one label per "
                           "feature row")
    if len(y) == 0:
        raise LtcacheError(f"{where}: the {split} split has no rows; give at least one")
    if f.shape[1] == 0 or f.shape[2] == 0:
        raise LtcacheError(f"{where}: '{f_key}' {tuple(f.shape)} has no views or no feature columns")
    if split != "train" and f.shape[1] > len(TEST_VIEW_NAMES):
        raise LtcacheError(f"{where}: '{f_key}' has {f.shape[1]} views; {split} holds at most 2 "
                           "(center, hflip): give [N, D] or [N, 2, D]")
    idx = arrays.get(i_key)
    if idx is None:
        idx = np.arange(len(y))
    elif idx.ndim != 1 or idx.dtype.kind not in "iu" or len(idx) != len(y):
        raise LtcacheError(f"{origin[i_key]}: '{i_key}' is {idx.dtype} {tuple(idx.shape)}; it must be [{len(y)}] "
                           "integers (or leave it out)")
    bad = ~np.isfinite(f)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise LtcacheError(f"{where}: '{f_key}' holds {int(bad.sum())} non-finite values (NaN/inf), the first in "
                           f"row {row}; fix or drop those rows before importing")
    names = (["clean"] + [f"aug{i}" for i in range(1, f.shape[1])]) if split == "train" \
        else list(TEST_VIEW_NAMES[:f.shape[1]])
    return f, y.astype(np.int64), idx.astype(np.int64), names


def _check_classifier(w, b, k: Optional[int], d: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] != d or (k is not None and w.shape[0] != k) or w.dtype.kind != "f":
        want = f"[{k if k is not None else 'K'}, {d}]"
        raise LtcacheError(f"{where}: weight is {w.dtype} {tuple(w.shape)}, expected {want} (classes x feature size); "
                           "pass the stage-1 classifier's W that maps these features to class logits")
    if b is None:
        b = np.zeros(w.shape[0], dtype=np.float32)
    b = np.asarray(b)
    if b.shape != (w.shape[0],) or b.dtype.kind != "f":
        raise LtcacheError(f"{where}: bias is {b.dtype} {tuple(b.shape)}, expected [{w.shape[0]}] floats")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise LtcacheError(f"{where}: the classifier holds NaN/inf; pass a trained, finite W and b")
    return w.astype(np.float32), b.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# a classifier when none is given
# ---------------------------------------------------------------------------------------------

def fit_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int, wd: float = FIT_WD,
                   max_iter: int = FIT_MAX_ITER) -> tuple[np.ndarray, np.ndarray, str]:
    """A plain cross-entropy linear head on features [N, V, D] (every view a row): full-batch
    L-BFGS from zero, CE + wd/2 ||W||^2, float32 on the CPU -- deterministic. Returns (W [K, D],
    b [K], a line saying how it was fit)."""
    n, v, d = features.shape
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).reshape(n * v, d)
    y = torch.from_numpy(labels).long().repeat_interleave(v)
    w = torch.zeros(num_classes, d, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.addmm(b, x, w.t()), y) + 0.5 * wd * w.pow(2).sum()
        loss.backward()
        return loss

    t0 = time.perf_counter()
    opt.step(closure)
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    with torch.no_grad():
        z = torch.addmm(b, x, w.t())
        loss = float(F.cross_entropy(z, y))
        acc = float((z.argmax(1) == y).double().mean() * 100)
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise LtcacheError("fitting the classifier diverged (non-finite weights); check the features' scale or "
                           "pass --classifier FILE")
    how = (f"fit by ltcache import: cross-entropy + {wd:g}/2 ||W||^2, full-batch L-BFGS (strong Wolfe) from zero, "
           f"{iters} iterations (max {max_iter}), float32 on the CPU, on all {n} x {v} train rows (every view); "
           f"train CE {loss:.4f}, train top-1 {acc:.2f}%, {time.perf_counter() - t0:.1f} s")
    return w.detach().numpy().copy(), b.detach().numpy().copy(), how


# ---------------------------------------------------------------------------------------------
# the import
# ---------------------------------------------------------------------------------------------

def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LtcacheError(f"--out {out} is a file; give a folder name for the cache")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise LtcacheError(f"--out {out} holds files but no cache (no {MANIFEST}); choose another folder")
        if not force:
            raise LtcacheError(f"--out {out} already holds a cache; pass --force to replace it or choose another folder")


def import_features(sources: Union[PathLike, Sequence[PathLike]], out: PathLike,
                    classifier: Optional[PathLike] = None, fit_classifier_head: bool = False,
                    name: Optional[str] = None, arch: str = "unknown", dtype: str = "float32",
                    shard_rows: int = 8192, force: bool = False, command: Optional[str] = None,
                    quiet: bool = True, stage1_seed: Optional[int] = None) -> Path:
    """Build a verified cache in ``out`` from features you already have (key convention: module
    docstring, or ``ltcache import --help``). ``classifier``: a file with the stage-1 W [K, D] and
    b [K]; ``fit_classifier_head``: fit a CE linear head instead; neither (and no weight/bias in
    the sources): a cache without a stage-1 classifier. ``stage1_seed``: the training seed of the
    backbone the features come from, when known (caches of one ``name`` with different seeds are
    replicates in a multi-cache ``bench`` / ``tune``). Returns ``out``."""
    paths = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(s) for s in sources]
    if not paths:
        raise LtcacheError("no features file given; e.g. `ltcache import feats.npz --out cache-mine`")
    out = Path(out)
    if dtype not in DTYPES:
        raise LtcacheError(f"unknown --dtype '{dtype}'; use float32 or float16")
    if shard_rows < 1:
        raise LtcacheError(f"--shard-rows must be >= 1 (got {shard_rows})")
    if classifier is not None and fit_classifier_head:
        raise LtcacheError("--classifier and --fit-classifier both give the stage-1 classifier; pass one of them")
    restore_interrupted_swap(out)                    # a replacement killed between its two renames
    _check_out(out, force)
    with output_lock(out, folder=False):
        restore_interrupted_swap(out)
        _check_out(out, force)
        return _import(paths, out, classifier, fit_classifier_head, name, arch, dtype, shard_rows, command, quiet,
                       stage1_seed)


def _import(paths, out, classifier, fit_head, name, arch, dtype, shard_rows, command, quiet,
            stage1_seed: Optional[int] = None) -> Path:
    """Read and check the sources, settle the stage-1 classifier, then write the cache."""
    arrays, origin = _merge(paths)
    splits, d = _read_splits(arrays, origin)
    w, b, clf_where = _given_classifier(arrays, origin, classifier, fit_head, d)
    bias_given = b is not None
    names_arr = arrays.get("class_names")
    labels_max = max(int(y.max()) for _, y, _, _ in splits.values())
    k = w.shape[0] if w is not None and np.ndim(w) == 2 else (len(names_arr) if names_arr is not None else labels_max + 1)
    if w is not None:
        w, b = _check_classifier(w, b, None, d, clf_where)
    counts, class_names = _check_labels(splits, origin, names_arr, k, w is not None)
    _check_range(splits, origin, dtype)
    w, b, clf_rec = _stage1_classifier(w, b, splits, k, d, fit_head, quiet)
    if clf_rec["source"] == "given":
        clf_rec["from"] = clf_where
        if classifier is not None:
            clf_rec["sha256"] = sha256_file(classifier)
        clf_rec["bias"] = "given" if bias_given else "zeros (none given)"
    command = command or _python_call(paths, classifier, fit_head, name, arch, dtype)
    body = _manifest(paths, arrays, origin, splits, counts, class_names, d, clf_rec, name=name, arch=arch,
                     dtype=dtype, shard_rows=shard_rows, command=command, stage1_seed=stage1_seed)
    return _write(out, splits, w, b, body, dtype, shard_rows, quiet)


def _read_splits(arrays: dict, origin: dict) -> tuple[dict, int]:
    """The splits the sources hold (features, labels, ..., views) and their common feature size D."""
    splits = {s: got for s in SPLITS if (got := _split_arrays(arrays, origin, s)) is not None}
    dims = {s: f.shape[2] for s, (f, *_rest) in splits.items()}
    if len(set(dims.values())) > 1:
        raise LtcacheError(f"the splits have different feature sizes ({', '.join(f'{s} D={v}' for s, v in dims.items())}); "
                           "give every split the features of the same model")
    return splits, dims["train"]


def _given_classifier(arrays: dict, origin: dict, classifier, fit_head: bool, d: int):
    """(W, b, where) of a stage-1 classifier in the sources or a --classifier file; (None, None,
    None) when neither gives one. Two sources of it, or a bias alone, are refused."""
    if ("weight" in arrays or "bias" in arrays) and classifier is not None:
        raise LtcacheError(f"{origin.get('weight', origin.get('bias'))} already holds weight/bias and --classifier "
                           f"{classifier} gives another; drop one")
    if "bias" in arrays and "weight" not in arrays:
        raise LtcacheError(f"{origin['bias']} has 'bias' but no 'weight'; give the classifier's W [K, D] too")
    if fit_head and "weight" in arrays:
        raise LtcacheError(f"{origin['weight']} already holds the classifier (weight/bias); drop --fit-classifier")
    if "weight" in arrays:
        return arrays["weight"], arrays.get("bias"), str(origin["weight"])
    if classifier is not None:
        w, b = read_classifier(classifier, d)
        return w, b, f"--classifier {classifier}"
    return None, None, None


def _check_labels(splits: dict, origin: dict, names_arr, k: int, has_classifier: bool) -> tuple[np.ndarray, list]:
    """Every label a class index in [0, k), every class with training rows, class_names of length k;
    returns the training counts and the class names."""
    for s, (_, y, _, _) in splits.items():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            why = "the classifier's rows" if has_classifier else "class_names" if names_arr is not None else "classes"
            raise LtcacheError(f"{origin[f'{s}_labels']}: '{s}_labels' holds {bad}, outside [0, {k}) ({k} {why}); "
                               "labels must be class indices 0..K-1")
    counts = np.bincount(splits["train"][1], minlength=k)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        shown = ", ".join(str(int(c)) for c in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise LtcacheError(f"{origin['train_labels']}: class {shown} has no training row (of {k} classes); every "
                           "class needs training rows (relabel to 0..K-1 without gaps)")
    if names_arr is None:
        return counts, [str(i) for i in range(k)]
    if names_arr.ndim != 1 or len(names_arr) != k:
        raise LtcacheError(f"{origin['class_names']}: class_names has {names_arr.shape} entries, expected [{k}]")
    return counts, [str(x) for x in names_arr.tolist()]


def _check_range(splits: dict, origin: dict, dtype: str) -> None:
    """Refuse features beyond the storage dtype's range (float16: 65504)."""
    limit = float(np.finfo(DTYPES[dtype]).max)
    for s, (f, *_rest) in splits.items():
        top = float(np.abs(f).max())
        if top > limit:
            fix = "import with --dtype float32" if dtype == "float16" else "rescale the features"
            raise LtcacheError(f"{origin[f'{s}_features']}: '{s}_features' reach {top:.3g}, beyond the {dtype} "
                               f"range; {fix}")


def _stage1_classifier(w, b, splits: dict, k: int, d: int, fit_head: bool, quiet: bool):
    """(W, b, record): the given classifier, one fit here (--fit-classifier), or a zero placeholder
    the loader accepts (source "none": methods that start from it are refused)."""
    from ltcache.progress import echo
    if w is not None:
        return w, b, {"source": "given"}
    if fit_head:
        w, b, how = fit_classifier(splits["train"][0], splits["train"][1], k)
        echo(how, quiet)
        return w, b, {"source": "fit", "how": how}
    fix = "re-import with `ltcache import ... --classifier FILE` (W [K, D], b [K]) or `--fit-classifier`"
    return np.zeros((k, d), np.float32), np.zeros(k, np.float32), {"source": "none", "fix": fix}


def _manifest(paths, arrays: dict, origin: dict, splits: dict, counts, class_names: list, d: int, clf_rec: dict, *,
              name, arch, dtype: str, shard_rows: int, command: str, stage1_seed: Optional[int]) -> dict:
    """The manifest body of an imported cache: what was imported (files, keys, sha256), its
    stage-1 classifier, its provenance and its key (what a re-import must match)."""
    sources = [{"path": str(p.resolve()), "format": "npy folder" if p.is_dir() else p.suffix.lower().lstrip("."),
                "sha256": _sha(p)} for p in paths]
    imb = float(counts.max() / counts.min())
    src = f"import:{paths[0].name}" + (f" (+{len(paths) - 1} files)" if len(paths) > 1 else "")
    dataset = {"name": name or "imported", "source": f"{name} ({src})" if name else src, "imported": True,
               "imb_ratio_observed": round(imb, 4)}
    extraction = {"imported": True, "views": {s: v[3] for s, v in splits.items()}}
    ck = {"path": None, "sha256": ""} if stage1_seed is None else {"path": None, "sha256": "", "stage1_seed": int(stage1_seed)}
    body = manifest_body(dataset, counts.tolist(), arch, d, ck, dtype, extraction)
    body["class_names"] = class_names
    body[STAGE1_KEY] = clf_rec
    body["import"] = {"sources": sources, "key_convention": KEY_CONVENTION,
                      "keys": {kk: [list(v.shape), str(v.dtype), str(origin[kk])] for kk, v in arrays.items()},
                      "classifier": clf_rec, "command": command}
    source = clf_rec["source"]
    body["provenance"] = {"imported from": ", ".join(f"{s['path']} (sha256 {s['sha256'][:12]})" for s in sources),
                          "stage-1 classifier": {"given": f"from {clf_rec.get('from')}", "fit": clf_rec.get("how"),
                                                 "none": "none (methods that start from it are refused)"}[source],
                          "command": command}
    body["key"] = {"source": "import", "sources_sha256": [s["sha256"] for s in sources], "dtype": dtype,
                   "shard_rows": shard_rows, "classifier": source}
    return body


def _sha(p: Path) -> str:
    if p.is_dir():
        import hashlib
        h = hashlib.sha256()
        for f in sorted(p.glob("*.npy")):
            h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
        return h.hexdigest()
    return sha256_file(p)


def _python_call(paths, classifier, fit_head, name, arch, dtype) -> str:
    args = [repr([str(p) for p in paths])] + [f"{k}={v!r}" for k, v in (
        ("classifier", str(classifier) if classifier else None), ("fit_classifier_head", fit_head),
        ("name", name), ("arch", arch), ("dtype", dtype)) if v]
    return f"ltcache.cache.importer.import_features({', '.join(args)}, ...)"


def _write(out: Path, splits: dict, w, b, body: dict, dtype: str, shard_rows: int, quiet: bool) -> Path:
    from ltcache.cache.load import load
    from ltcache.progress import echo

    tmp = out.with_name(f".{out.name}.new")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise os_error(exc, tmp) from None
    try:
        block = {}
        for s, (f, y, idx, views) in splits.items():
            f = f.astype(DTYPES[dtype], copy=False)
            recs = [write_shard(tmp / shard_name(s, i // shard_rows), f[i:i + shard_rows], y[i:i + shard_rows],
                                idx[i:i + shard_rows]) for i in range(0, len(y), shard_rows)]
            block[s] = {"views": views, "rows": int(len(y)), "shards": recs}
        clf = write_classifier(tmp / CLASSIFIER, w, b)
        from ltcache.version import __version__
        from ltcache.cache.manifest import SCHEMA_VERSION
        man = {"schema_version": SCHEMA_VERSION, "ltcache_version": __version__,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **body, "splits": block, "classifier": clf,
               "extra_files": {}}
        write_manifest(man, tmp / MANIFEST)
        load(tmp, quiet=True)                          # verify what was written before it takes the name
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(exc, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rows = ", ".join(f"{s} {v['rows']}" for s, v in block.items())
    echo(f"imported {rows} rows -> {out}", quiet)
    return out
