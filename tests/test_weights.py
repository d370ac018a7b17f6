"""weights/: safe reading of both formats, the component split, EMA names and family detection.

The oracles are independent of our code: `safetensors.torch.load_file`, the original code's layouts
(`layouts/*.json`, including the EMA names LitEma produced) and the tiny fixtures.
"""
import json
import os
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, LAYOUT_FAMILY, layout
from weights import (
    SCHEDULE_BUFFERS, CheckpointError, detect_family, ema_name, ema_unet, has_ema, read_checkpoint,
    read_header, read_metadata, schedule_buffers, split_components,
)
from weights.safe_pickle import InertStub, load_torch_file

SD1_ST = FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors"
SD1_CKPT = FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"


def assert_one_line_naming(err: pytest.ExceptionInfo, path: Path, *words: str):
    msg = str(err.value)
    assert "\n" not in msg and path.name in msg, msg
    for w in words:
        assert w in msg, msg


def mapped_file(ptr: int):
    """The file backing the memory mapping that holds address `ptr`, or None for anonymous memory."""
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5].strip() if len(fields) > 5 else None
    return None


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")


# ---------------------------------------------------------------- safetensors


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_safetensors_equals_reference_reader(name):
    path = FIXTURES[name] / f"{name}.safetensors"
    ours, ref = read_checkpoint(path), load_file(path)
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k], ref[k]), k
    assert read_header(path) == {k: (tuple(v.shape), v.dtype) for k, v in ref.items()}


def test_safetensors_dtypes_scalars_and_empty(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    tensors = {
        "f64": x.double(), "f32": x, "f16": x.half(), "bf16": x.bfloat16(),
        "i64": torch.randint(-2**40, 2**40, (7,), generator=g),
        "i32": torch.randint(-9, 9, (2, 3), generator=g, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16), "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8), "bool": x > 0,
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4), "odd_u8": torch.arange(3, dtype=torch.uint8),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "dtypes"})
    ours, ref = read_checkpoint(path), load_file(path)
    assert set(ours) == set(ref) == set(tensors)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    assert read_metadata(path) == {"format": "pt", "note": "dtypes"}


def _write_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_misaligned_tensor_is_read_correctly(tmp_path):
    # 3 bytes of u8 put the float32 tensor at an odd offset, which the format allows.
    path = tmp_path / "odd.safetensors"
    f32 = torch.tensor([1.25, -2.5], dtype=torch.float32)
    _write_safetensors(path, {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}},
                       bytes([7, 8, 9]) + f32.numpy().tobytes())
    ours = read_checkpoint(path)
    assert ours["a"].tolist() == [7, 8, 9]
    assert torch.equal(ours["b"], f32)
    assert torch.equal(ours["b"], load_file(path)["b"])


@pytest.mark.parametrize("text", [
    ' \n{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',  # whitespace before the object
    '{"a":["F32",[2],[0,8]]}',  # an entry as an array: serde reads a struct from a sequence
    '{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8],"extra":[1,{"x":null}]}}',
    '{"a":{"dtype":"I8","shape":[3],"data_offsets":[0,3]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
])
def test_safetensors_reads_what_the_library_reads(tmp_path, text):
    """Headers the safetensors library accepts in forms a hand-written reader would not expect: ours reads
    them as it does (the library decides validity and gives the layout)."""
    path = tmp_path / "quirk.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + struct.pack("<2f", 1.5, -2.0))
    ours, ref = read_checkpoint(path), load_file(path)
    assert ours.keys() == ref.keys() == {"a"} and torch.equal(ours["a"], ref["a"])
    assert read_header(path) == {"a": ((2,), torch.float32)}


def test_safetensors_whose_length_reads_as_a_pickle(tmp_path):
    """A header of 640 bytes starts the file with 0x80 0x02, a pickle's first bytes: still safetensors."""
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"note": ""}}
    text = json.dumps(header)
    header["__metadata__"]["note"] = "x" * (640 - len(text))
    raw = json.dumps(header).encode()
    assert len(raw) == 640 and struct.pack("<Q", 640)[:2] == b"\x80\x02"
    path = tmp_path / "p.safetensors"
    path.write_bytes(struct.pack("<Q", 640) + raw + struct.pack("<2f", 1.0, 2.0))
    assert read_checkpoint(path)["w"].tolist() == [1.0, 2.0]
    assert read_metadata(path)["note"] == "x" * (640 - len(text))


@pytest.mark.parametrize("header, size, words", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, ["invalid offset"]),  # overlapping
    ('{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}', 8, ["invalid JSON"]),
    # the library accepts packed 4-bit floats; torch has no whole-byte type for them
    ({"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, 2, ["dtype F4", "does not support"]),
])
def test_safetensors_refusals_are_one_line(tmp_path, header, size, words):
    path = tmp_path / "bad.safetensors"
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(size))
    for read in (read_checkpoint, read_header, read_metadata):
        with pytest.raises(CheckpointError) as e:
            read(path)
        assert_one_line_naming(e, path, *words)


@needs_proc_maps
def test_safetensors_tensors_are_views_of_a_file_mapping(tmp_path):
    path = tmp_path / "copy.safetensors"
    path.write_bytes(SD1_ST.read_bytes())
    sd = read_checkpoint(path)
    backing = {mapped_file(t.data_ptr()) for t in sd.values() if t.numel()}
    assert backing == {str(path.resolve())}  # not anonymous (copied) memory
    # The mapping is private: writing into a tensor must not change the file on disk.
    key = "model.diffusion_model.out.2.weight"
    before = load_file(path)[key].clone()
    sd[key].add_(1.0)
    assert torch.equal(load_file(path)[key], before)


def test_mapped_tensors_can_be_saved_again(tmp_path):
    """Converters re-save what they read: the views must not look like one buffer of mixed dtypes."""
    sd = read_checkpoint(SD1_ST)
    save_file(sd, tmp_path / "again.safetensors")
    torch.save(sd, tmp_path / "again.ckpt")
    for again in (read_checkpoint(tmp_path / "again.safetensors"), read_checkpoint(tmp_path / "again.ckpt")):
        assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)


@needs_proc_maps
def test_zip_ckpt_is_memory_mapped():
    sd = read_checkpoint(SD1_CKPT)
    backing = {mapped_file(t.data_ptr()) for t in sd.values() if t.numel()}
    assert backing == {str(SD1_CKPT.resolve())}


def test_ckpt_equals_safetensors_for_every_key():
    ckpt, st = read_checkpoint(SD1_CKPT), read_checkpoint(SD1_ST)
    assert set(ckpt) == set(st)
    for k in st:
        assert ckpt[k].dtype == st[k].dtype and torch.equal(ckpt[k], st[k]), k


def test_renamed_files(tmp_path):
    (tmp_path / "st.ckpt").write_bytes(SD1_ST.read_bytes())
    ref, ours = load_file(SD1_ST), read_checkpoint(tmp_path / "st.ckpt")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(SD1_CKPT.read_bytes())
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert_one_line_naming(e, path, "rename it to .ckpt")


@pytest.mark.parametrize("cut", [4, 20, 0.5, -1])
def test_truncated_safetensors(tmp_path, cut):
    data = SD1_ST.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert_one_line_naming(e, path, "truncated")


# ---------------------------------------------------------------- pickles: what must load


def _sd_small():
    g = torch.Generator().manual_seed(1)
    return {"model.diffusion_model.w": torch.randn(4, 3, generator=g),
            "first_stage_model.b": torch.randn(2, generator=g).half(),
            "steps": torch.tensor(3, dtype=torch.int64)}


def _save(obj, path, fmt):
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


def _assert_same(loaded, expected):
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_top_level_state_dict_without_wrapper(tmp_path, fmt):
    sd = _sd_small()
    path = tmp_path / "bare.pt"
    _save({**sd, "param": torch.nn.Parameter(torch.ones(2))}, path, fmt)
    out = read_checkpoint(path)
    _assert_same({k: v for k, v in out.items() if k != "param"}, sd)
    assert type(out["param"]) is torch.Tensor and torch.equal(out["param"], torch.ones(2))


def _fake_module(m, name: str) -> types.ModuleType:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        m.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return sys.modules[name]


def _foreign_class(m, module: str, qualname: str) -> type:
    cls = type(qualname, (), {"__module__": module, "__qualname__": qualname,
                              "__init__": lambda self, **kw: self.__dict__.update(kw)})
    setattr(_fake_module(m, module), qualname, cls)
    return cls


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("module", ["pytorch_lightning.callbacks.model_checkpoint",
                                    "lightning.pytorch.callbacks.model_checkpoint"])
def test_lightning_checkpoint_loads_without_lightning(tmp_path, fmt, module):
    sd = _sd_small()
    path = tmp_path / "lightning.ckpt"
    with pytest.MonkeyPatch.context() as m:
        ModelCheckpoint = _foreign_class(m, module, "ModelCheckpoint")
        # Old Lightning keys callback state by the class itself; newer ones keep instances around.
        _save({"epoch": 3, "global_step": np.int64(5), "pytorch-lightning_version": "1.4.2",
               "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "monitor": None}},
               "trainer_cb": ModelCheckpoint(dirpath="/logs", best_k_models={"a": torch.tensor(1.0)}),
               "state_dict": sd}, path, fmt)
    assert module.split(".")[0] not in sys.modules
    _assert_same(read_checkpoint(path), sd)
    raw = load_torch_file(path)
    assert raw["epoch"] == 3 and raw["global_step"] == 5
    (cb,) = raw["callbacks"]
    assert issubclass(cb, InertStub) and f"{cb.__module__}.{cb.__qualname__}" == f"{module}.ModelCheckpoint"
    assert isinstance(raw["trainer_cb"], InertStub) and not vars(raw["trainer_cb"])  # state dropped


def test_lightning_named_callable_is_never_called(tmp_path):
    """A stand-in replaces the foreign name even when the real one is importable and would act."""
    marker = tmp_path / "called"
    path = tmp_path / "sneaky.ckpt"
    with pytest.MonkeyPatch.context() as m:
        mod = _fake_module(m, "pytorch_lightning.utilities.fake")

        def touch(p):
            Path(p).write_text("ran")
        touch.__module__, touch.__qualname__ = mod.__name__, "touch"
        mod.touch = touch
        Payload = type("Payload", (), {"__reduce__": lambda self: (touch, (str(marker),))})
        torch.save({"state_dict": _sd_small(), "hook": Payload()}, path)
        _assert_same(read_checkpoint(path), _sd_small())  # loaded while the module is importable
    assert not marker.exists()


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_numpy_scalars_and_arrays_load(tmp_path, numpy_module):
    path = tmp_path / "np.ckpt"
    sd = _sd_small()
    torch.save({"state_dict": sd, "global_step": np.int64(5), "lr": np.float32(0.5), "seen": np.arange(3)},
               path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    # numpy 1 wrote `numpy.core.multiarray`, numpy 2 writes `numpy._core.multiarray`: files of both exist.
    current = np.int64(1).__reduce__()[0].__module__.encode()
    assert current + b"\nscalar\n" in data
    path.write_bytes(data.replace(current + b"\n", numpy_module.encode() + b"\n"))
    assert numpy_module.encode() + b"\nscalar\n" in path.read_bytes()
    _assert_same(read_checkpoint(path), sd)
    raw = load_torch_file(path)
    assert raw["global_step"] == 5 and raw["lr"] == np.float32(0.5) and raw["seen"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------- pickles: what must be refused


class _NumpyForgery:
    """What numpy's pickle of `scalar(dtype, bytes)` becomes when a file forges the dtype: `code` and the
    BUILD `state` of the dtype are the file's. A void dtype given an object field by its state, with
    numpy's own unpickling, is a pointer the file chooses (the segfault of issue 11)."""

    def __init__(self, code, state, data=b"\x00" * 8):
        self.code, self.state, self.data = code, state, data

    def __reduce__(self):
        dtype = type("D", (), {"__reduce__": lambda _: (np.dtype, (self.code, False, True), self.state)})()
        return np.int64(0).__reduce__()[0], (dtype, self.data)


_PLAIN_STATE = (3, "<", None, None, None, -1, -1, 0)
_FIELDS_STATE = (3, "|", None, ("f0",), {"f0": (np.dtype("u8"), 0)}, 8, 1, 0x3F)


@pytest.mark.parametrize("code,state,data,why", [
    ("V8", _FIELDS_STATE, b"\x00" * 8, "not a plain number type"),  # the void dtype the attack needs
    ("O", _PLAIN_STATE, b"\x00" * 8, "not a plain number type"),  # an object scalar: a pointer
    ("u8", _FIELDS_STATE, b"\x00" * 8, "fields or sub-arrays"),  # a plain code given fields by BUILD
    ("i8", _PLAIN_STATE, b"\x00" * 4, "needs 8 bytes"),  # too few bytes for its dtype
])
def test_forged_numpy_values_are_refused_in_a_clean_process(tmp_path, code, state, data, why):
    """Run in a child process: were numpy handed the forged state, a crash must fail this test, not the run."""
    import subprocess
    import sys

    path = tmp_path / "forged.ckpt"
    torch.save({"state_dict": _sd_small(), "global_step": _NumpyForgery(code, state, data)}, path)
    child = ("import sys; from weights import CheckpointError, read_checkpoint\n"
             "try:\n    read_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refusing" in done.stdout and why in done.stdout and len(done.stdout.strip().splitlines()) == 1


def test_plain_numpy_scalar_states_keep_their_byte_order(tmp_path):
    path = tmp_path / "big.ckpt"
    big = (3, ">", None, None, None, -1, -1, 0)
    torch.save({"state_dict": _sd_small(), "v": _NumpyForgery("i4", big, (7).to_bytes(4, "big"))}, path)
    assert load_torch_file(path)["v"] == 7



class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


PAYLOADS = {"system": (_System, os.system.__module__ + ".system"), "open": (_Open, ".open"),  # io.open
            "eval": (_Eval, "builtins.eval")}


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, fmt, payload):
    cls, global_name = PAYLOADS[payload]
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    _save({"evil": cls(marker), "state_dict": _sd_small()}, path, fmt)
    for read in (read_checkpoint, read_header):
        with pytest.raises(CheckpointError) as e:
            read(path)
        assert_one_line_naming(e, path, "refusing", global_name)
    assert not marker.exists()


def test_hostile_payload_is_live(tmp_path):
    """The refusal test above can fail: an unrestricted unpickler does run the payload."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Open(marker))).close()
    assert marker.exists()


def test_plain_pickle_of_tensors_is_refused(tmp_path):
    # pickle.dump of a tensor stores its bytes via torch.storage._load_from_bytes, an unrestricted torch.load.
    path = tmp_path / "plain.pt"
    _save({"w": torch.zeros(2)}, path, "raw")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert_one_line_naming(e, path, "refusing")


# ---------------------------------------------------------------- files that are not checkpoints


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_pickle(tmp_path, fmt, fraction):
    full = tmp_path / "full.ckpt"
    if fmt == "zip":
        full.write_bytes(SD1_CKPT.read_bytes())
    else:
        torch.save({"state_dict": read_checkpoint(SD1_ST)}, full, _use_new_zipfile_serialization=False)
    data = full.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert_one_line_naming(e, path, "truncated")


def _png_bytes():
    return b"\x89PNG\r\n\x1a\n" + bytes(range(200))


@pytest.mark.parametrize("name, content, words", [
    ("image.ckpt", _png_bytes(), ["image"]),
    ("notes.ckpt", b"these are not the weights you are looking for\n" * 5, ["not a checkpoint"]),
    ("page.safetensors", b"<!DOCTYPE html><html><body>Sign in</body></html>", ["HTML"]),
    ("lfs.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 42651\n", ["LFS"]),
    ("empty.ckpt", b"", ["empty"]),
    ("empty.safetensors", b"", ["empty"]),
    ("model.bin", b"PK\x03\x04", ["extension"]),
])
def test_not_a_checkpoint(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert_one_line_naming(e, path, *words)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "sd-v1-4.ckpt")
    assert_one_line_naming(e, tmp_path / "sd-v1-4.ckpt", "not found")
    folder = tmp_path / "stable-diffusion-v1-5"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(folder)
    assert_one_line_naming(e, folder, "directory", "diffusers")


def test_top_level_that_is_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert_one_line_naming(e, path, "list")


# ---------------------------------------------------------------- components


def _layout_keys(stem):
    return {k: None for k in layout(stem)["keys"]}


@pytest.mark.parametrize("stem", sorted(LAYOUT_FAMILY))
def test_split_covers_every_official_key(stem):
    keys = layout(stem)["keys"]
    c = split_components(_layout_keys(stem))
    assert c.unknown == []
    rebuilt = {f"{prefix}{k}" for name, prefix in
               [("unet", "model.diffusion_model."), ("vae", "first_stage_model."),
                ("clip_text", "cond_stage_model.transformer."), ("openclip_text", "cond_stage_model.model.")]
               for k in c.parts.get(name, {})}
    assert rebuilt | set(c.extras) == set(keys) and not rebuilt & set(c.extras)
    assert set(SCHEDULE_BUFFERS) <= set(c.extras)
    text = "clip_text" if LAYOUT_FAMILY[stem].startswith("sd1") else "openclip_text"
    assert set(c.parts) == {"unet", "vae", text}
    counts = layout(stem)["param_counts"]
    assert len(c.parts["unet"]) == counts["model.diffusion_model"]["param_tensors"]
    assert len(c.parts["vae"]) == counts["first_stage_model"]["param_tensors"]
    assert len(c.parts[text]) == counts["cond_stage_model"]["param_tensors"]


def test_split_fixture_and_schedule_buffers():
    sd = read_checkpoint(SD1_ST)
    c = split_components(sd)
    assert c.unknown == [] and "cond_stage_model.transformer.text_model.embeddings.position_ids" in c.extras
    assert "text_model.final_layer_norm.weight" in c.parts["clip_text"]
    assert c.parts["unet"]["out.2.weight"] is sd["model.diffusion_model.out.2.weight"]  # no copies
    buffers = schedule_buffers(sd)
    assert list(buffers) == list(SCHEDULE_BUFFERS)
    # linear schedule of the original config: linspace of square roots, squared, in float64
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert (buffers["betas"].double() - betas).abs().max() < 1e-7
    assert (buffers["alphas_cumprod"].double() - torch.cumprod(1 - betas, 0)).abs().max() < 1e-6


@pytest.mark.parametrize("prefixed, loss", [(False, False), (False, True), (True, False), (True, True)])
def test_lone_vae_file(prefixed, loss):
    vae = {k[len("first_stage_model."):]: v for k, v in layout("sd1")["keys"].items()
           if k.startswith("first_stage_model.")}
    sd = {("first_stage_model." if prefixed else "") + k: v for k, v in vae.items()}
    if loss:
        sd.update({"loss.logvar": [[], "float32"],
                   "loss.discriminator.main.0.weight": [[64, 3, 4, 4], "float32"]})
    c = split_components(sd)
    assert set(c.parts) == {"vae"} and c.parts["vae"].keys() == vae.keys() and c.unknown == []
    assert set(c.extras) == ({"loss.logvar", "loss.discriminator.main.0.weight"} if loss else set())
    assert detect_family(sd) == "vae"


def test_ema_names_match_the_original_litema():
    unet_keys = [k[len("model.diffusion_model."):] for k in layout("sd1")["keys"]
                 if k.startswith("model.diffusion_model.")]
    official = set(layout("sd1")["ema_keys"])
    assert {ema_name(k) for k in unet_keys} | {"model_ema.decay", "model_ema.num_updates"} == official


def test_ema_unet_selects_the_shadow_weights():
    sd = read_checkpoint(SD1_ST)
    unet_keys = [k[len("model.diffusion_model."):] for k in sd if k.startswith("model.diffusion_model.")]
    assert not has_ema(sd)
    with pytest.raises(CheckpointError) as e:
        ema_unet(sd, unet_keys, source="tiny.ckpt")
    assert "tiny.ckpt" in str(e.value) and "--ema" in str(e.value) and "\n" not in str(e.value)
    # LitEma's shadow copy: same names with the dots removed, different values
    full = dict(sd)
    full.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): 2 * sd["model.diffusion_model." + k]
                 for k in unet_keys})
    full["model_ema.decay"] = torch.tensor(0.9999)
    full["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    assert has_ema(full)
    ema = ema_unet(full, unet_keys)
    assert list(ema) == unet_keys
    for k in unet_keys:
        assert torch.equal(ema[k], sd["model.diffusion_model." + k] * 2), k
    assert split_components(full).unknown == []
    del full[ema_name(unet_keys[3])]
    with pytest.raises(CheckpointError, match="incomplete"):
        ema_unet(full, unet_keys)


# ---------------------------------------------------------------- families


@pytest.mark.parametrize("stem", sorted(LAYOUT_FAMILY))
def test_family_of_official_layouts(stem):
    keys = layout(stem)["keys"]
    assert detect_family({k: tuple(v[0]) for k, v in keys.items()}) == LAYOUT_FAMILY[stem]
    assert detect_family(keys) == LAYOUT_FAMILY[stem]  # (shape, dtype) pairs as in the layout files
    unet_only = {k: tuple(v[0]) for k, v in keys.items() if k.startswith("model.diffusion_model.")}
    assert detect_family(unet_only) == LAYOUT_FAMILY[stem]


@pytest.mark.parametrize("name, family", [("sd1_tiny", "sd1"), ("sd2_tiny", "sd2"), ("sd2v_tiny", "sd2")])
def test_family_of_fixtures(name, family):
    header = read_header(FIXTURES[name] / f"{name}.safetensors")
    assert detect_family(header) == family
    # the tiny models' 32-wide context matches neither 768 nor 1024: proj_in decides
    unet_only = {k: v for k, v in header.items() if k.startswith("model.diffusion_model.")}
    assert detect_family(unet_only) == family


def test_family_of_sd1_variants(tmp_path):
    keys = {k: tuple(v[0]) for k, v in layout("sd1")["keys"].items()}
    no_text_model = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                     for k, v in keys.items()}
    no_position_ids = {k: v for k, v in keys.items() if not k.endswith("position_ids")}
    assert detect_family(no_text_model) == detect_family(no_position_ids) == "sd1"
    fp16 = {k: v.half() if v.is_floating_point() else v for k, v in read_checkpoint(SD1_ST).items()}
    path = tmp_path / "pruned-fp16.safetensors"
    save_file(fp16, path)
    assert detect_family(read_header(path)) == "sd1"
    assert {d for _, d in read_header(path).values()} == {torch.float16, torch.int64}


def test_unrecognised_files_are_named(tmp_path):
    keys = {k: tuple(v[0]) for k, v in layout("sd1")["keys"].items()}
    source = tmp_path / "odd.safetensors"
    cases = {
        "6 input channels": {**keys, "model.diffusion_model.input_blocks.0.0.weight": (320, 6, 3, 3)},
        "SDXL": {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
                 "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)},
        "diffusers": {"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)},
        "no Stable Diffusion UNet": {"cond_stage_model.model.ln_final.weight": (1024,)},
        "inconsistent": {**{k: v for k, v in keys.items() if not k.startswith("cond_stage_model.")},
                         "cond_stage_model.model.ln_final.weight": (1024,)},
    }
    for words, shapes in cases.items():
        with pytest.raises(CheckpointError) as e:
            detect_family(shapes, source=source)
        assert_one_line_naming(e, source, words)


@pytest.mark.parametrize("name", ["sd1_tiny.ckpt", "sd1_tiny.safetensors"])
def test_mutated_checkpoints_read_or_fail_with_one_error_type(tmp_path, name):
    """A seeded fuzz over both formats: bytes changed at the start (headers, the pickle), at the end (a
    zip's central directory: its file names once escaped as UnicodeDecodeError), and cut files. Each
    mutant is read or refused with a CheckpointError that names the file; no other exception leaves."""
    from conftest import FIXTURES

    data = (FIXTURES["sd1_tiny"] / name).read_bytes()
    rng = np.random.default_rng(1234)
    head, tail = (0, min(len(data), 4096)), (max(0, len(data) - 4096), len(data))
    refused = 0
    for i in range(120):
        mutant = bytearray(data)
        if i % 3 == 2:
            mutant = mutant[:int(rng.integers(0, len(data)))]
        else:
            for at in rng.integers(*(head if i % 3 == 0 else tail), size=int(rng.integers(1, 6))):
                mutant[at] = int(rng.integers(0, 256))
        path = tmp_path / f"m{i}{Path(name).suffix}"
        path.write_bytes(bytes(mutant))
        try:
            read_checkpoint(path)
        except CheckpointError as e:
            assert path.name in str(e) and "\n" not in str(e)
            refused += 1
    assert refused > 0
