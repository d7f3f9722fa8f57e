"""evit_jax.convert: strict torch <-> flax conversion, checkpoint wrappers, files, Orbax directories, CLI.

Bit-exact round trips for every dtype; wrong or truncated checkpoints fail with one error naming the
offending keys (and the likely model) and leave nothing behind. The all-model sweep is in test_models.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from evit_jax import convert
from evit_jax.convert.__main__ import main as cli_main
from evit_jax.convert.tensors import to_numpy, to_torch

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- helpers


def random_state_dict(name: str, layout: str = "official", dtype=np.float32, seed: int = 0, num_classes=None) -> dict:
    """Random arrays for every key of the model; counters beyond int32 so that int64 must survive."""
    rng = np.random.default_rng(seed)
    out = {}
    for e in convert.key_table(name, layout, num_classes=num_classes):
        if e.is_float:
            out[e.torch_key] = rng.standard_normal(e.torch_shape, dtype=np.float32).astype(dtype)
        else:
            out[e.torch_key] = np.asarray(rng.integers(2**33, 2**40), dtype=np.int64)
    return out


def assert_bit_equal(a: dict, b: dict) -> None:
    """Same keys (nested variables trees are flattened), dtypes, shapes and bytes."""
    a, b = traverse_util.flatten_dict(dict(a)), traverse_util.flatten_dict(dict(b))
    assert set(a) == set(b), (set(a) ^ set(b))
    for key in a:
        x, y = to_numpy(a[key]), to_numpy(b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, (key, x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), key


def timm_state_dict(torch, name: str, dtype) -> dict:
    """A timm model's state dict with randomised values (all float tensors) and counters, in `dtype`."""
    import timm

    model = timm.create_model(name, pretrained=False)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            out[key] = torch.randn(value.shape, generator=gen).to(dtype)
        else:
            out[key] = torch.randint(0, 10_000, value.shape, generator=gen, dtype=value.dtype)
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -------------------------------------------------------------------------------- python API


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_tensors_round_trip_bit_exact_timm_and_official(torch, dtype):
    sd = timm_state_dict(torch, "efficientvit_b0", getattr(torch, dtype))
    variables = convert.torch_to_flax(sd, "efficientvit_b0")  # layout auto-detected: timm
    kernel = variables["params"]["backbone"]["input_stem_op_list_0"]["conv"]["kernel"]
    assert isinstance(kernel, np.ndarray) and kernel.dtype == np.dtype(getattr(ml_dtypes, dtype, dtype))
    assert kernel.shape == (3, 3, 3, 8)  # HWIO
    counter = variables["batch_stats"]["backbone"]["input_stem_op_list_0"]["norm"]["num_batches_tracked"]
    assert counter.dtype == np.int64
    assert_bit_equal(convert.flax_to_torch(variables, "efficientvit_b0", layout="timm"), sd)
    official = convert.flax_to_torch(variables, "efficientvit_b0", layout="official")
    assert "head.op_list.3.linear.weight" in official and len(official) == len(sd) == 197
    assert_bit_equal(convert.torch_to_flax(official, "efficientvit_b0", layout="official"), variables)


def test_layout_detection_and_explicit_layouts():
    official = random_state_dict("efficientvit_l1", "official")
    timm_sd = random_state_dict("efficientvit_l1", "timm")
    assert convert.detect_layout(official, "efficientvit_l1") == "official"
    assert convert.detect_layout(timm_sd, "efficientvit_l1") == "timm"
    assert_bit_equal(convert.torch_to_flax(official, "efficientvit_l1"), convert.torch_to_flax(
        convert.flax_to_torch(convert.torch_to_flax(official, "efficientvit_l1"), "efficientvit_l1", "timm"),
        "efficientvit_l1", layout="timm"))
    with pytest.raises(ValueError, match="timm-layout checkpoint.*layout='timm'"):
        convert.torch_to_flax(timm_sd, "efficientvit_l1", layout="official")


def test_official_wrappers_ema_and_ddp_prefix():
    plain = random_state_dict("efficientvit_b0", seed=1)
    ema = random_state_dict("efficientvit_b0", seed=2)
    ddp = {f"module.{k}": v for k, v in plain.items()}
    expected_plain = convert.torch_to_flax(plain, "efficientvit_b0")
    expected_ema = convert.torch_to_flax(ema, "efficientvit_b0")
    training_ckpt = {"state_dict": ddp, "ema": {0.9998: ema}, "epoch": 3, "optimizer": {"state": {}}}
    assert_bit_equal(convert.torch_to_flax(training_ckpt, "efficientvit_b0"), expected_plain)
    assert_bit_equal(convert.torch_to_flax(training_ckpt, "efficientvit_b0", use_ema=True), expected_ema)
    for wrapped in ({"state_dict": plain, "ema": ema}, {"ema": {"state_dict": ema}}, {"state_dict_ema": ema}):
        assert_bit_equal(convert.torch_to_flax(wrapped, "efficientvit_b0", use_ema=True), expected_ema)
    for no_ema in ({"state_dict": plain, "ema": None}, {"state_dict": plain}, plain):
        with pytest.raises(ValueError, match="EMA weights were asked for"):
            convert.torch_to_flax(no_ema, "efficientvit_b0", use_ema=True)
    with pytest.raises(ValueError, match="cannot find a state dict"):
        convert.torch_to_flax({"epoch": 3}, "efficientvit_b0")
    with pytest.raises(ValueError, match="1 unexpected.*None of its keys look like an EfficientViT checkpoint"):
        convert.torch_to_flax({"fc.weight": np.zeros((2, 2), np.float32)}, "efficientvit_b0")


def test_backbone_accepts_keys_with_or_without_prefix():
    full = random_state_dict("efficientvit_b0")
    prefixed = {k: v for k, v in full.items() if k.startswith("backbone.")}
    bare = {k[len("backbone."):]: v for k, v in prefixed.items()}
    a = convert.torch_to_flax(prefixed, "efficientvit_backbone_b0")
    assert_bit_equal(a, convert.torch_to_flax(bare, "efficientvit_backbone_b0"))
    assert_bit_equal(a["params"], convert.torch_to_flax(full, "efficientvit_b0")["params"]["backbone"])
    assert set(convert.flax_to_torch(a, "efficientvit_backbone_b0")) == set(bare)
    with pytest.raises(ValueError, match=r"most likely belongs to efficientvit_b0.*unexpected \(11\): head\.op_list"):
        convert.torch_to_flax(full, "efficientvit_backbone_b0")


def test_wrong_model_names_the_likely_model():
    sd = random_state_dict("efficientvit_seg_b1_ade20k")
    with pytest.raises(ValueError) as info:
        convert.torch_to_flax(sd, "efficientvit_seg_b1_cityscapes")
    message = str(info.value)
    assert "does not fit efficientvit_seg_b1_cityscapes" in message
    assert "most likely belongs to efficientvit_seg_b1_ade20k" in message
    assert "head.output_ops.0.op_list.0.conv.weight" in message  # named offending keys
    assert "\n" not in message


def test_truncated_and_misshaped_checkpoint_lists_every_offender():
    sd = random_state_dict("efficientvit_b1")
    dropped = [k for k in sd if ".stages.3.op_list.2." in k]
    for key in dropped:
        del sd[key]
    sd["backbone.extra.weight"] = np.zeros(3, np.float32)
    sd["backbone.input_stem.op_list.0.conv.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    sd["backbone.input_stem.op_list.0.norm.num_batches_tracked"] = np.zeros((), np.float32)
    with pytest.raises(ValueError) as info:
        convert.torch_to_flax(sd, "efficientvit_b1")
    message = str(info.value)
    assert f"{len(dropped)} missing, 1 unexpected, 2 of the wrong shape or dtype" in message
    assert "local_module.main.point_conv.norm.{weight,bias,running_mean,running_var,num_batches_tracked}" in message
    assert "backbone.extra.weight" in message
    assert "backbone.input_stem.op_list.0.conv.weight (checkpoint (16, 3, 5, 5), model (16, 3, 3, 3))" in message
    assert "num_batches_tracked (checkpoint float32, model needs a integer dtype)" in message
    assert "likely" not in message  # it is the right model, only damaged


def test_long_lists_are_capped_with_counts():
    sd = random_state_dict("efficientvit_b3")
    keep = dict(list(sd.items())[:10])
    with pytest.raises(ValueError) as info:
        convert.torch_to_flax(keep, "efficientvit_b3")
    message = str(info.value)
    assert f"missing ({len(sd) - 10})" in message and "more" in message
    assert len(message) < 4000


def test_num_classes_hint_and_override():
    sd = random_state_dict("efficientvit_b0", num_classes=10)
    with pytest.raises(ValueError, match="classifier has 10 classes: pass num_classes=10"):
        convert.torch_to_flax(sd, "efficientvit_b0")
    variables = convert.torch_to_flax(sd, "efficientvit_b0", num_classes=10)
    assert variables["params"]["head"]["op_list_3"]["linear"]["kernel"].shape == (1280, 10)
    assert_bit_equal(convert.flax_to_torch(variables, "efficientvit_b0", num_classes=10), sd)


def test_bad_arguments():
    sd = random_state_dict("efficientvit_b0")
    with pytest.raises(ValueError, match="unknown model 'efficientvit_b9'"):
        convert.torch_to_flax(sd, "efficientvit_b9")
    with pytest.raises(ValueError, match="has no timm layout"):
        convert.flax_to_torch({}, "efficientvit_seg_b0_cityscapes", layout="timm")
    with pytest.raises(ValueError, match="layout must be one of"):
        convert.torch_to_flax(sd, "efficientvit_b0", layout="keras")
    with pytest.raises(ValueError, match="layout must be one of official, timm"):
        convert.flax_to_torch({}, "efficientvit_b0", layout="auto")
    variables = convert.torch_to_flax(sd, "efficientvit_b0")
    del variables["batch_stats"]["head"]
    with pytest.raises(ValueError, match=r"variables do not fit efficientvit_b0: 3 missing.*batch_stats/head/op_list_0/norm/\{mean,var,num_batches_tracked\}"):
        convert.flax_to_torch(variables, "efficientvit_b0")


def test_aliases_resolve_to_the_same_table():
    assert convert.key_table("efficientvit-b1") == convert.key_table("efficientvit_b1.r224_in1k")
    assert convert.key_table("efficientvit-seg-b1-cityscapes") == convert.key_table("efficientvit_seg_b1_cityscapes")


# -------------------------------------------------------------------------------- files and Orbax


def test_read_checkpoint_formats(tmp_path, torch):
    sd = random_state_dict("efficientvit_b0", dtype=ml_dtypes.bfloat16)
    pt = tmp_path / "a.pt"
    torch.save({"state_dict": {k: to_torch(v) for k, v in sd.items()}}, pt)
    assert_bit_equal(convert.read_checkpoint(pt)["state_dict"], sd)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": argparse.Namespace(a=1)}, evil)
    with pytest.raises(ValueError, match=r"evil\.pth: cannot read it with torch.load\(weights_only=True\)"):
        convert.read_checkpoint(evil)
    with pytest.raises(ValueError, match="unsupported checkpoint file type '.npz'"):
        convert.load_variables(tmp_path / "x.npz", "efficientvit_b0")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_variables(tmp_path / "missing.pt", "efficientvit_b0")
    with pytest.raises(ValueError, match="not one written by evit_jax save_variables"):
        convert.load_variables(tmp_path, "efficientvit_b0")


def test_save_and_load_variables_orbax(tmp_path):
    sd = random_state_dict("efficientvit_b0", dtype=np.float16)
    variables = convert.torch_to_flax(sd, "efficientvit_b0")
    out = tmp_path / "ckpt"
    convert.save_variables(variables, out, "efficientvit-b0", source={"path": "x.pt", "ema": False})
    metadata = convert.read_metadata(out)
    assert metadata["model"] == "efficientvit_b0" and metadata["num_classes"] == 1000 and metadata["layout"] == "flax"
    assert_bit_equal(convert.load_variables(out, "efficientvit_b0"), variables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers

    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        convert.save_variables(variables, out, "efficientvit_b0")
    with pytest.raises(ValueError, match="holds variables converted for efficientvit_b0, not efficientvit_b1"):
        convert.load_variables(out, "efficientvit_b1")
    with pytest.raises(ValueError, match="was not converted from EMA weights"):
        convert.load_variables(out, "efficientvit_b0", use_ema=True)

    other = convert.torch_to_flax(random_state_dict("efficientvit_b0", seed=5), "efficientvit_b0")
    convert.save_variables(other, out, "efficientvit_b0", overwrite=True)
    assert_bit_equal(convert.load_variables(out, "efficientvit_b0"), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    # Variables of another model: refused before anything is written.
    with pytest.raises(ValueError, match="variables do not fit efficientvit_b1"):
        convert.save_variables(other, tmp_path / "never", "efficientvit_b1")
    assert not (tmp_path / "never").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    variables = convert.torch_to_flax(random_state_dict("efficientvit_b0"), "efficientvit_b0")

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert.save_variables(variables, tmp_path / "dst", "efficientvit_b0")
    assert list(tmp_path.iterdir()) == []


def test_load_pretrained_orbax_and_file(tmp_path, torch):
    sd = random_state_dict("efficientvit_b0", num_classes=10, seed=3)
    pt = tmp_path / "ft.pth"
    torch.save({k: to_torch(v) for k, v in sd.items()}, pt)
    assert cli_main(["to-flax", "--model", "efficientvit_b0", "--num-classes", "10", str(pt), str(tmp_path / "d")]) == 0
    model, variables = convert.load_pretrained("efficientvit_b0", tmp_path / "d")
    x = jnp.zeros((1, 32, 32, 3))
    assert jax.jit(model.apply)(variables, x).shape == (1, 10)
    import evit_jax

    with pytest.raises(ValueError, match="ft.pth: .*pass num_classes=10"):
        evit_jax.load_pretrained("efficientvit_b0", str(pt))
    model2, variables2 = convert.load_pretrained("efficientvit_b0", pt, num_classes=10)
    assert_bit_equal(variables2, variables)
    assert model2.head.num_classes == 10


# ------------------------------------------------------------------------------------------ CLI


def test_cli_official_training_checkpoint_round_trips(tmp_path, torch):
    plain = random_state_dict("efficientvit_b0", dtype=np.float32, seed=1)
    ema = random_state_dict("efficientvit_b0", dtype=ml_dtypes.bfloat16, seed=2)
    src = tmp_path / "train.pt"
    torch.save({"state_dict": {f"module.{k}": to_torch(v) for k, v in plain.items()},
                "ema": {0.9998: {k: to_torch(v) for k, v in ema.items()}}, "epoch": 7}, src)

    assert cli_main(["to-flax", "--model", "efficientvit-b0", str(src), str(tmp_path / "plain")]) == 0
    assert cli_main(["to-torch", "--model", "efficientvit_b0", str(tmp_path / "plain"), str(tmp_path / "plain.pt")]) == 0
    written = torch.load(tmp_path / "plain.pt", map_location="cpu", weights_only=True)
    assert list(written) == ["state_dict"]
    assert_bit_equal(written["state_dict"], plain)
    # A checkpoint file as the source: official .pt -> timm .pth directly.
    assert cli_main(["to-torch", "--model", "efficientvit_b0", "--layout", "timm", str(tmp_path / "plain.pt"),
                     str(tmp_path / "direct_timm.pth")]) == 0
    direct = torch.load(tmp_path / "direct_timm.pth", map_location="cpu", weights_only=True)
    assert_bit_equal(direct, convert.flax_to_torch(convert.torch_to_flax(plain, "efficientvit_b0"), "efficientvit_b0", "timm"))

    assert cli_main(["to-flax", "--model", "efficientvit_b0", "--use-ema", str(src), str(tmp_path / "ema")]) == 0
    assert convert.read_metadata(tmp_path / "ema")["source"]["ema"] is True
    assert cli_main(["to-torch", "--model", "efficientvit_b0", str(tmp_path / "ema"), str(tmp_path / "ema.safetensors")]) == 0
    from safetensors.numpy import load_file

    assert_bit_equal(load_file(str(tmp_path / "ema.safetensors")), ema)
    assert cli_main(["to-torch", "--model", "efficientvit_b0", "--layout", "timm", str(tmp_path / "ema"),
                     str(tmp_path / "ema_timm.pth")]) == 0
    timm_sd = torch.load(tmp_path / "ema_timm.pth", map_location="cpu", weights_only=True)
    assert "stem.in_conv.conv.weight" in timm_sd  # bare timm state dict
    assert_bit_equal(convert.flax_to_torch(convert.torch_to_flax(timm_sd, "efficientvit_b0"), "efficientvit_b0"), ema)


def test_cli_timm_safetensors_round_trips(tmp_path, torch):
    from safetensors.numpy import load_file, save_file

    sd = random_state_dict("efficientvit_l1", "timm", dtype=np.float16)
    save_file(sd, str(tmp_path / "timm.safetensors"))
    assert cli_main(["to-flax", "--model", "efficientvit_l1", str(tmp_path / "timm.safetensors"), str(tmp_path / "d")]) == 0
    assert cli_main(["to-torch", "--model", "efficientvit_l1", "--layout", "timm", str(tmp_path / "d"),
                     str(tmp_path / "back.safetensors")]) == 0
    assert_bit_equal(load_file(str(tmp_path / "back.safetensors")), sd)


def test_cli_errors_write_nothing(tmp_path, torch, capsys):
    sd = random_state_dict("efficientvit_b0")
    src = tmp_path / "b0.pt"
    torch.save({"state_dict": {k: to_torch(v) for k, v in sd.items()}}, src)
    dst = tmp_path / "out"
    assert cli_main(["to-flax", "--model", "efficientvit_b0", "--use-ema", str(src), str(dst)]) == 2
    assert "EMA weights were asked for" in one_line_error(capsys)
    assert cli_main(["to-flax", "--model", "efficientvit_b7", str(src), str(dst)]) == 2
    assert "unknown model 'efficientvit_b7'" in one_line_error(capsys)
    assert cli_main(["to-flax", "--model", "efficientvit_seg_b0_cityscapes", "--layout", "timm", str(src), str(dst)]) == 2
    assert "has no timm layout" in one_line_error(capsys)
    assert not dst.exists()

    assert cli_main(["to-flax", "--model", "efficientvit_b0", str(src), str(dst)]) == 0
    capsys.readouterr()
    assert cli_main(["to-flax", "--model", "efficientvit_b0", str(src), str(dst)]) == 2
    assert "exists and is not empty" in one_line_error(capsys)
    assert cli_main(["to-torch", "--model", "efficientvit_b1", str(dst), str(tmp_path / "x.pt")]) == 2
    assert "converted for efficientvit_b0, not efficientvit_b1" in one_line_error(capsys)
    assert cli_main(["to-torch", "--model", "efficientvit_b0", str(dst), str(tmp_path / "x.onnx")]) == 2
    assert "unsupported checkpoint file type '.onnx'" in one_line_error(capsys)
    assert cli_main(["to-torch", "--model", "efficientvit_b0", str(dst), str(src)]) == 2
    assert "already exists" in one_line_error(capsys)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.onnx").exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "evit_jax.convert", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_cli_process_wrong_model(tmp_path, torch):
    """The real entry point: exit code 2, one line on stderr naming keys and the likely model, no output."""
    sd = random_state_dict("efficientvit_b0")
    wrong = tmp_path / "b0.pt"
    torch.save({"state_dict": {k: to_torch(v) for k, v in sd.items()}}, wrong)
    result = _run_cli("to-flax", "--model", "efficientvit_b1", str(wrong), str(tmp_path / "dst"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert "does not fit efficientvit_b1" in result.stderr
    assert "most likely belongs to efficientvit_b0" in result.stderr
    assert "missing (75): backbone.stages.1.op_list.2.main.depth_conv.conv.weight" in result.stderr
    assert not (tmp_path / "dst").exists()


def test_cli_truncated_checkpoint(tmp_path, capsys):
    from safetensors.numpy import save_file

    sd = random_state_dict("efficientvit_b0")
    truncated = tmp_path / "trunc.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("head.op_list.3")}, str(truncated))
    assert cli_main(["to-flax", "--model", "efficientvit_b0", str(truncated), str(tmp_path / "dst")]) == 2
    err = one_line_error(capsys)
    assert "trunc.safetensors: checkpoint does not fit efficientvit_b0 (official layout): 2 missing" in err
    assert "missing (2): head.op_list.3.linear.{weight,bias}" in err
    assert not (tmp_path / "dst").exists()
