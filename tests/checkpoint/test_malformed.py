"""A corpus of malformed checkpoints, each built here from a real fixture by one defect.

Every case must raise exactly one :class:`jaxfp4.CheckpointError` whose message names the file
and (where a tensor is at fault) the tensor; ``load_checkpoint`` returns nothing in that case.
Pickled weights are refused without being unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest

import jaxfp4
from jaxfp4.checkpoint.safetensors_io import SafetensorsFile

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
M = "model.layers.0.mlp.down_proj"


def read_raw(path: str) -> dict[str, tuple[str, list[int], bytes]]:
    sf = SafetensorsFile(path)
    out = {n: (i.dtype, list(i.shape), np.asarray(sf.read(n)).tobytes()) for n, i in sf.tensors.items()}
    sf.close()
    return out


def write_raw(path: str, tensors: dict[str, tuple[str, list[int], bytes]], *, header_patch=None, raw_header=None) -> None:
    """A safetensors writer that can be told to lie (``header_patch(header)`` edits the JSON)."""
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if header_patch is not None:
        header_patch(header)
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes | str) -> None:
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def copy_fixture(name: str, tmp_path) -> str:
    dst = os.path.join(tmp_path, name)
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def edit_tensors(ckpt: str, fn, *, file: str = "model.safetensors", **write_kw) -> str:
    path = os.path.join(ckpt, file)
    t = read_raw(path)
    fn(t)
    write_raw(path, t, **write_kw)
    return path


def edit_config(ckpt: str, fn) -> str:
    path = os.path.join(ckpt, "config.json")
    with open(path) as f:
        c = json.load(f)
    fn(c)
    with open(path, "w") as f:
        json.dump(c, f)
    return path


def set_f32(t, key, value):
    dtype, shape, _ = t[key]
    t[key] = (dtype, shape, np.full(shape, value, np.float32).tobytes())


def set_byte(t, key, index, byte):
    dtype, shape, data = t[key]
    b = bytearray(data)
    b[index] = byte
    t[key] = (dtype, shape, bytes(b))


def expect_error(path, *, file: str, tensor: str | None = None, match: str = "", **kw):
    with pytest.raises(jaxfp4.CheckpointError) as e:
        jaxfp4.load_checkpoint(path, **kw)
    msg = str(e.value)
    assert os.path.basename(file) in msg, msg
    if tensor is not None:
        assert repr(tensor) in msg, msg
    assert match.lower() in msg.lower(), msg
    return e.value


# --- file-level defects ------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    p = os.path.join(ck, "model.safetensors")
    write_bytes(p, read_bytes(p)[:-100])
    expect_error(ck, file=p, match="truncated")


def test_header_length_past_end_of_file(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    p = os.path.join(ck, "model.safetensors")
    data = bytearray(read_bytes(p))
    data[:8] = struct.pack("<Q", len(data) * 2)
    write_bytes(p, bytes(data))
    expect_error(ck, file=p, match="does not fit")


def test_header_not_json(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    p = edit_tensors(ck, lambda t: None, raw_header=b"{not json")
    expect_error(ck, file=p, match="not valid JSON")


def test_header_offsets_lie_about_size(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_scale"
    p = edit_tensors(ck, lambda t: None, header_patch=lambda h: h[key].update(shape=[64, 9]))
    expect_error(ck, file=p, tensor=key, match="offsets lie")


def test_header_offsets_overlap(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)

    def patch(h):
        a, b = sorted((k for k in h if h[k]["dtype"] == "U8"), key=lambda k: h[k]["data_offsets"][0])[:2]
        size_b = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        start = h[a]["data_offsets"][0]
        h[b]["data_offsets"] = [start, start + size_b]

    p = edit_tensors(ck, lambda t: None, header_patch=patch)
    expect_error(ck, file=p, match="overlap")


def test_duplicate_key_in_header(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    p = os.path.join(ck, "model.safetensors")
    t = read_raw(p)
    key = M + ".weight_global_scale"
    entry = json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    header = {"a": 0}
    text = json.dumps(header).replace('{"a": 0}', "{" + f'"{key}": {entry}, "{key}": {entry}' + "}").encode()
    write_raw(p, {key: t[key]}, raw_header=text)
    expect_error(ck, file=p, tensor=key, match="duplicate")


def test_unknown_safetensors_dtype(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_packed"
    p = edit_tensors(ck, lambda t: None, header_patch=lambda h: h[key].update(dtype="F4_E2M1"))
    expect_error(ck, file=p, tensor=key, match="unknown safetensors dtype")


def test_pickle_is_refused_and_never_unpickled(tmp_path):
    ck = os.path.join(tmp_path, "pickled")
    os.makedirs(ck)
    shutil.copy(os.path.join(FIXTURES, "ct-nvfp4a16", "config.json"), ck)
    canary = os.path.join(tmp_path, "unpickled")

    class Boom:
        def __reduce__(self):
            return (open, (canary, "w"))

    with open(os.path.join(ck, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Boom(), f)
    expect_error(ck, file="pytorch_model.bin", match="never unpickles")
    assert not os.path.exists(canary)


# --- config-level defects ----------------------------------------------------------------------


def test_missing_config(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    os.remove(os.path.join(ck, "config.json"))
    expect_error(ck, file="config.json", match="not found")


def test_config_not_json(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    write_bytes(os.path.join(ck, "config.json"), "{")
    expect_error(ck, file="config.json", match="not valid JSON")


def test_unknown_quant_method(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    p = edit_config(ck, lambda c: c["quantization_config"].update(quant_method="bitsandbytes"))
    expect_error(ck, file=p, match="unknown quant_method 'bitsandbytes'")


def test_unsupported_ct_format(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    p = edit_config(ck, lambda c: c["quantization_config"]["config_groups"]["group_0"].update(format="float-quantized"))
    expect_error(ck, file=p, match="not an FP4 format")


def test_ct_not_compressed(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    p = edit_config(ck, lambda c: c["quantization_config"].update(quantization_status="frozen"))
    expect_error(ck, file=p, match="quantization_status")


def test_not_quantized(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    p = edit_config(ck, lambda c: c.pop("quantization_config"))
    expect_error(ck, file=p, match="not a quantized checkpoint")


def test_ignored_module_stored_quantized(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    edit_config(ck, lambda c: c["quantization_config"]["ignore"].append(M))
    expect_error(ck, file="model.safetensors", tensor=M + ".weight_packed", match="ignore list")


# --- tensor-level defects ----------------------------------------------------------------------


def test_wrong_dtype_codes(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_packed"
    p = edit_tensors(ck, lambda t: t.update({key: ("I8", t[key][1], t[key][2])}))
    expect_error(ck, file=p, tensor=key, match="must be U8")


def test_wrong_dtype_block_scale(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_scale"
    p = edit_tensors(ck, lambda t: t.update({key: ("U8", t[key][1], t[key][2])}))
    expect_error(ck, file=p, tensor=key, match="F8_E4M3")


def test_wrong_dtype_global_scale(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_global_scale"
    p = edit_tensors(ck, lambda t: t.update({key: ("F16", [2], np.ones(2, np.float16).tobytes())}))
    expect_error(ck, file=p, tensor=key, match="F32")


def test_wrong_shape_block_scale(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_scale"
    p = edit_tensors(ck, lambda t: t.update({key: ("F8_E4M3", [32, 16], t[key][2])}))
    expect_error(ck, file=p, tensor=key, match="expected [64, 8]")


def test_k_not_multiple_of_block(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_packed"

    def cut(t):
        t[key] = ("U8", [64, 36], np.zeros((64, 36), np.uint8).tobytes())  # K = 72

    p = edit_tensors(ck, cut)
    expect_error(ck, file=p, tensor=key, match="K=72 is not a multiple")


def test_missing_block_scale(tmp_path):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    p = edit_tensors(ck, lambda t: t.pop(M + ".weight_scale"))
    err = expect_error(ck, file=p, tensor=M + ".weight_scale", match="needs its scales")
    assert err.report.missing


def test_missing_global_scale_modelopt(tmp_path):
    ck = copy_fixture("modelopt-nvfp4", tmp_path)
    p = edit_tensors(ck, lambda t: t.pop(M + ".weight_scale_2"))
    expect_error(ck, file=p, tensor=M + ".weight_scale_2", match="global scale")


@pytest.mark.parametrize("value", [np.nan, np.inf, 0.0, -26496.0])
def test_bad_global_scale_value(tmp_path, value):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_global_scale"
    p = edit_tensors(ck, lambda t: set_f32(t, key, value))
    expect_error(ck, file=p, tensor=key, match="must be finite and > 0")


def test_nan_activation_scale_modelopt(tmp_path):
    ck = copy_fixture("modelopt-nvfp4", tmp_path)
    key = M + ".input_scale"
    p = edit_tensors(ck, lambda t: set_f32(t, key, np.nan))
    expect_error(ck, file=p, tensor=key, match="input scale is nan")


def test_activation_scale_wrong_shape_quark(tmp_path):
    ck = copy_fixture("quark-mxfp4-fp8", tmp_path)
    key = M + ".input_scale"
    p = edit_tensors(ck, lambda t: t.update({key: ("BF16", [2], t[key][2] * 2)}))
    expect_error(ck, file=p, tensor=key, match="one value")


@pytest.mark.parametrize("byte,why", [(0x7F, "NaN"), (0xFF, "NaN"), (0xB8, "negative")])
def test_bad_e4m3_block_scale(tmp_path, byte, why):
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_scale"
    p = edit_tensors(ck, lambda t: set_byte(t, key, 17, byte))
    expect_error(ck, file=p, tensor=key, match=why)


def test_e8m0_0xff(tmp_path):
    ck = copy_fixture("ct-mxfp4a16", tmp_path)
    key = M + ".weight_scale"
    p = edit_tensors(ck, lambda t: set_byte(t, key, 3, 0xFF))
    expect_error(ck, file=p, tensor=key, match="0xFF")


def test_two_producers_conventions_mixed(tmp_path):
    """A compressed-tensors checkpoint that also carries a ModelOpt-style multiplier."""
    ck = copy_fixture("ct-nvfp4a16", tmp_path)
    key = M + ".weight_scale_2"
    p = edit_tensors(ck, lambda t: t.update({key: ("F32", [], np.float32(1e-4).tobytes())}))
    expect_error(ck, file=p, tensor=key, match="conventions mixed")


def test_modelopt_tensors_under_ct_config(tmp_path):
    """ModelOpt bytes declared as compressed-tensors: the packed codes are not where CT keeps them."""
    ck = copy_fixture("modelopt-nvfp4", tmp_path)
    os.remove(os.path.join(ck, "hf_quant_config.json"))
    with open(os.path.join(FIXTURES, "ct-nvfp4a16", "config.json")) as f:
        ct_config = json.load(f)
    edit_config(ck, lambda c: c.update(quantization_config=ct_config["quantization_config"]))
    expect_error(ck, file="model.safetensors", match="conventions mixed")


# --- sharding defects --------------------------------------------------------------------------


def test_index_names_missing_shard(tmp_path):
    ck = copy_fixture("ct-nvfp4", tmp_path)
    shard = sorted(f for f in os.listdir(ck) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(ck, shard))
    expect_error(ck, file="model.safetensors.index.json", match=f"shard {shard!r}, which does not exist")


def test_index_lists_tensor_its_shard_lacks(tmp_path):
    ck = copy_fixture("ct-nvfp4", tmp_path)
    index = os.path.join(ck, "model.safetensors.index.json")
    with open(index) as f:
        idx = json.load(f)
    shard = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"]["model.layers.9.mlp.up_proj.weight_packed"] = shard
    with open(index, "w") as f:
        json.dump(idx, f)
    expect_error(ck, file=shard, tensor="model.layers.9.mlp.up_proj.weight_packed", match="not in its shard")


def test_duplicate_key_across_shards(tmp_path):
    ck = copy_fixture("ct-nvfp4", tmp_path)
    shards = sorted(f for f in os.listdir(ck) if f.endswith(".safetensors"))
    first = read_raw(os.path.join(ck, shards[0]))
    dup = next(iter(first))
    edit_tensors(ck, lambda t: t.update({dup: first[dup]}), file=shards[1])
    expect_error(ck, file=shards[1], tensor=dup, match="duplicate key")


def test_not_a_directory(tmp_path):
    expect_error(os.path.join(tmp_path, "nope"), file="nope", match="not a checkpoint directory")
