"""Export files: an IntNet written as npz or h5 (ternet's own: int8 weights, integer thresholds,
the graph as JSON) or as a CUTIE folder (per-layer .npy files and _config.json), and read back
into the identical IntNet. Packed trits (2 bits each, or 5 per byte) are an option of the folder.
Exercise: pytest tests/test_export.py -k roundtrip; `ternet export RUN --format cutie`.
"""
import io
import json
import os
import pathlib
import shutil

import numpy as np

from .intref import IntNet, IntNetError
from .targets import hw_layers

CUTIE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# trit packing

def pack_2bit(t):
    """int8 trits -> uint8, four per byte, first trit in the low bits; 00 = 0, 01 = +1, 11 = -1
    (10 unused). The last byte is padded with 0 trits."""
    t = np.asarray(t).reshape(-1)
    code = np.where(t > 0, 1, np.where(t < 0, 3, 0)).astype(np.uint8)
    code = np.concatenate([code, np.zeros(-len(code) % 4, np.uint8)]).reshape(-1, 4)
    return (code[:, 0] | code[:, 1] << 2 | code[:, 2] << 4 | code[:, 3] << 6).astype(np.uint8)


def unpack_2bit(b, n):
    code = (np.asarray(b, np.uint8)[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    code = code.reshape(-1)[:n]
    if (code == 2).any():
        raise IntNetError("2-bit trit code 10 is not a trit")
    return np.where(code == 1, 1, np.where(code == 3, -1, 0)).astype(np.int8)


def pack_5trit(t):
    """int8 trits -> uint8, five per byte: byte = sum_i (t_i + 1) 3^i (0..242), first trit least
    significant (1.6 bits per trit). The last byte is padded with 0 trits."""
    t = np.asarray(t, np.int64).reshape(-1) + 1
    t = np.concatenate([t, np.ones(-len(t) % 5, np.int64)]).reshape(-1, 5)
    return (t @ np.array([1, 3, 9, 27, 81])).astype(np.uint8)


def unpack_5trit(b, n):
    b = np.asarray(b, np.int64)
    if (b > 242).any():
        raise IntNetError("5-trit byte above 242 is not a code")
    digits = (b[:, None] // np.array([1, 3, 9, 27, 81])) % 3
    return (digits.reshape(-1)[:n] - 1).astype(np.int8)


# ----------------------------------------------------------------------------------------------
# npz / h5

def _atomic(path, write):
    tmp = pathlib.Path(f"{path}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_npz(net, path):
    def w(tmp):
        buf = io.BytesIO()
        np.savez_compressed(buf, __graph__=np.array(net.graph_json()), **net.arrays)
        tmp.write_bytes(buf.getvalue())
    _atomic(path, w)


def write_h5(net, path):
    import h5py

    def w(tmp):
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["format"], f.attrs["version"] = "ternet-intnet", 1
            f.attrs["graph"] = net.graph_json()
            g = f.create_group("arrays")
            for k, a in net.arrays.items():
                g.create_dataset(k, data=a, track_times=False)
    _atomic(path, w)


def _read_npz(path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__graph__"}
        if "__graph__" not in z.files:
            raise IntNetError(f"{path}: no __graph__ entry; not a ternet export")
        return IntNet.from_json(str(z["__graph__"]), arrays, str(path))


def _read_h5(path):
    import h5py
    with h5py.File(path, "r") as f:
        if "graph" not in f.attrs:
            raise IntNetError(f"{path}: no graph attribute; not a ternet export")
        arrays = {k: f["arrays"][k][()] for k in f["arrays"]}
        return IntNet.from_json(f.attrs["graph"], arrays, str(path))


# ----------------------------------------------------------------------------------------------
# CUTIE folder

def _layer_files(net, layer, prefix):
    """{file name: (array, array key or None, layout)} of one accelerator layer."""
    m, a, files = layer.main, layer.act, {}
    w = net.arr(m, "weight")
    if m["op"] == "conv":
        files[f"{prefix}_weights.npy"] = (w.transpose(0, 3, 1, 2), f"{m['name']}.weight", "OIHW")
    else:
        h, wd, c = layer.in_shape
        files[f"{prefix}_weights.npy"] = (w.reshape(len(w), h, wd, c).transpose(0, 3, 1, 2),
                                          f"{m['name']}.weight", "OIHW-flat")
    if a is not None and a["op"] in ("threshold", "threshold2"):
        for k in ("lo", "hi"):
            files[f"{prefix}_thresh_{k}.npy"] = (net.arr(a, k), f"{a['name']}.{k}", "plain")
    else:
        zeros = np.zeros(w.shape[0], np.int32)      # the engine's dense layer keeps no thresholds
        files[f"{prefix}_thresh_lo.npy"] = (zeros, None, "plain")
        files[f"{prefix}_thresh_hi.npy"] = (zeros, None, "plain")
    if a is not None and a["op"] == "affine":       # logits = acc * mult + offset, on the host
        for k in ("mult", "offset"):
            files[f"{prefix}_{k}.npy"] = (net.arr(a, k), f"{a['name']}.{k}", "plain")
    return files


def _layer_config(net, layer):
    m, (h, w, c) = layer.main, layer.in_shape
    k = net.arr(m, "weight").shape
    conv = m["op"] == "conv"
    pool = layer.pool or layer.post_pool
    return {
        "conv_type": "dense" if layer.fp_out else "2d",
        "conv_stride": [m["stride"]] * 2 if conv else [1, 1],
        "conv_in_ch": int(c), "conv_out_ch": int(k[0]),
        "conv_k": [int(k[1]), int(k[2])] if conv else [int(h), int(w)],
        "conv_padding": [m["pad"]] * 2 if conv else [0, 0],
        "pooling": pool is not None,
        "pool_type": ({"maxpool": "max", "sumpool": "avg"}[pool["op"]]) if pool else "max",
        "pool_k": [pool["k"]] * 2 if pool else [0, 0],
        "fp_out": layer.fp_out,
        # beyond the engine's fields: what a simulator needs to read the layer exactly
        "ternet": {"in_shape": [int(h), int(w), int(c)], "pool_stride": pool["stride"] if pool else 0,
                   "pool_padding": pool["pad"] if pool else 0,
                   "thresholds_on": "window sum" if pool and pool["op"] == "sumpool" else "accumulator",
                   "pool_after_thresholds_moved": layer.post_pool is not None,
                   "residual": layer.act is not None and layer.act["op"] == "threshold2",
                   "nodes": [n["name"] for n in (m, layer.pool, layer.act, layer.post_pool) if n]},
    }


def write_cutie(net, path, name="net", pack=(), findings=None):
    """One folder: per layer {name}_l{i}_weights.npy (int8, (out, in, kh, kw)), _thresh_lo.npy,
    _thresh_hi.npy, _config.json (+ _weights_2bit.npy / _weights_5trit.npy with pack), and
    {name}_graph.json + {name}_extra.npz: the rest of the IntNet, so the folder reads back whole."""
    path = pathlib.Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or any(path.glob("*_graph.json")))):
        raise IntNetError(f"{path} exists and is not an earlier CUTIE export; pick another --out")
    tmp = pathlib.Path(f"{path}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    placed = {}
    for layer in hw_layers(net):
        prefix = f"{name}_l{layer.index}"
        for fname, (arr, key, layout) in _layer_files(net, layer, prefix).items():
            np.save(tmp / fname, np.ascontiguousarray(arr))
            if key:
                placed[key] = {"file": fname, "layout": layout, "shape": list(net.arrays[key].shape)}
            if fname.endswith("_weights.npy"):
                trits = np.ascontiguousarray(arr).reshape(-1)
                if "2bit" in pack:
                    np.save(tmp / f"{prefix}_weights_2bit.npy", pack_2bit(trits))
                if "5trit" in pack:
                    np.save(tmp / f"{prefix}_weights_5trit.npy", pack_5trit(trits))
        (tmp / f"{prefix}_config.json").write_text(json.dumps(_layer_config(net, layer), indent=1) + "\n")
    for node in net.nodes:
        if node["op"] == "input":
            np.save(tmp / f"{name}_input_lut.npy", net.arr(node, "lut"))
            placed[f"{node['name']}.lut"] = {"file": f"{name}_input_lut.npy", "layout": "plain",
                                             "shape": list(net.arr(node, "lut").shape)}
    rest = {k: a for k, a in net.arrays.items() if k not in placed}
    np.savez_compressed(tmp / f"{name}_extra.npz", **rest)
    graph = json.loads(net.graph_json())
    graph["cutie"] = {"version": CUTIE_VERSION, "name": name, "placed": placed, "pack": sorted(pack),
                      "findings": findings or []}
    (tmp / f"{name}_graph.json").write_text(json.dumps(graph, indent=1, sort_keys=True) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _read_cutie(path):
    path = pathlib.Path(path)
    graphs = sorted(path.glob("*_graph.json"))
    if len(graphs) != 1:
        raise IntNetError(f"{path}: expected one *_graph.json in the folder, found {len(graphs)}. "
                          "HINT: pass a folder written by `ternet export --format cutie`")
    graph = json.loads(graphs[0].read_text())
    cut = graph.pop("cutie")
    with np.load(path / f"{cut['name']}_extra.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key, where in cut["placed"].items():
        a = np.load(path / where["file"], allow_pickle=False)
        if where["layout"] != "plain":
            a = a.transpose(0, 2, 3, 1)
        arrays[key] = np.ascontiguousarray(a.reshape(where["shape"]))
    return IntNet.from_json(json.dumps(graph), arrays, str(path))


# ----------------------------------------------------------------------------------------------

FORMATS = ("npz", "h5", "cutie")


def write(net, path, fmt, **kw):
    """Write `net` to path in format fmt (npz | h5 | cutie); kw go to write_cutie."""
    if fmt not in FORMATS:
        raise IntNetError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "cutie":
        write_cutie(net, path, **kw)
    else:
        (write_npz if fmt == "npz" else write_h5)(net, path)


def read(path):
    """IntNet from an export: a CUTIE folder, a .npz or a .h5 file."""
    path = pathlib.Path(path)
    if path.is_dir():
        return _read_cutie(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        return _read_npz(path)
    if head.startswith(b"\x89HDF"):
        return _read_h5(path)
    raise IntNetError(f"{path}: neither a CUTIE folder, an npz nor an h5 export")
