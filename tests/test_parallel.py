"""Mesh, sharding rules and host-local -> global batches (8 virtual CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fairjax import parallel
from fairjax.errors import UserError
from fairjax.errors import ShardingError


def test_mesh_shape_fills_minus_one():
    assert parallel.mesh_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert parallel.mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parallel.mesh_shape({"data": 1, "fsdp": 2, "tensor": -1}, 8) == {"data": 1, "fsdp": 2, "tensor": 4}


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"data": 16}, ["needs 16 devices", "only 8"]),
        ({"data": 4, "fsdp": 4}, ["needs 16 devices"]),
        ({"data": 2}, ["uses 2 of the 8"]),
        ({"data": 3, "fsdp": -1}, ["do not divide the 8 devices"]),
        ({"data": -1, "fsdp": -1}, ["only one axis may be -1"]),
        ({"model": 2}, ["unknown axis", "model"]),
        ({"data": 0}, ["data=0"]),
    ],
)
def test_bad_mesh_is_one_line_error(spec, words):
    with pytest.raises(ShardingError) as e:
        parallel.make_mesh(spec)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, UserError)
    for w in words:
        assert w in msg


def test_make_mesh_axes_and_devices():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.ravel()) == sorted(d.id for d in jax.devices())


def test_fsdp_default_shards_largest_divisible_dim():
    assert parallel.fsdp_spec((3, 8, 16), 4) == P(None, None, "fsdp")
    assert parallel.fsdp_spec((32, 8), 4) == P("fsdp", None)
    assert parallel.fsdp_spec((6, 16, 5), 4) == P(None, "fsdp", None)
    assert parallel.fsdp_spec((3, 5), 4) == P()  # nothing divisible: replicated
    assert parallel.fsdp_spec((2,), 4) == P()  # smaller than the axis
    assert parallel.fsdp_spec((), 4) == P()
    assert parallel.fsdp_spec((16, 16), 1) == P()  # no fsdp axis


def test_rules_first_match_wins_then_default():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tree = {
        "attn": {"to_q": {"kernel": np.zeros((8, 16)), "bias": np.zeros((16,))}},
        "norm": {"scale": np.zeros((6,))},
        "proj": {"kernel": np.zeros((4, 6))},
    }
    rules = [(r"to_q/kernel$", (None, "tensor")), (r"to_q", ("fsdp",)), (r"norm", ())]
    sh = parallel.param_shardings(tree, mesh, rules)
    assert sh["attn"]["to_q"]["kernel"].spec == P(None, "tensor")
    assert sh["attn"]["to_q"]["bias"].spec == P("fsdp")
    assert sh["norm"]["scale"].spec == P()
    assert sh["proj"]["kernel"].spec == P(None, "fsdp")  # default: 6 is the largest dim divisible by 2


def test_rule_that_does_not_divide_names_param():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ShardingError, match=r"splits dim 6 of param a/kernel .*4 ways") as e:
        parallel.param_shardings({"a": {"kernel": np.zeros((6, 3))}}, mesh, [("kernel", ("fsdp", None))])
    assert "\n" not in str(e.value)


def test_batch_that_does_not_divide_is_one_line_error():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ShardingError) as e:
        parallel.check_batch_size(12, mesh)
    msg = str(e.value)
    assert "global batch 12" in msg and "data=2 x fsdp=4" in msg and "multiple of 8" in msg and "\n" not in msg
    with pytest.raises(ShardingError, match="x 4 gradient-accumulation micro-batches = 32"):
        parallel.check_batch_size(16, mesh, multiple=4)
    parallel.check_batch_size(16, mesh)
    with pytest.raises(ShardingError, match="global batch 12"):
        parallel.global_batch({"x": np.zeros((12, 3), np.float32)}, mesh)


def test_global_batch_places_rows_over_batch_axes():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    s = np.arange(8, dtype=np.int32)
    g = parallel.global_batch({"x": x, "s": s}, mesh, global_size=8)
    np.testing.assert_array_equal(np.asarray(g["x"]), x)
    np.testing.assert_array_equal(np.asarray(g["s"]), s)
    assert g["x"].sharding.spec == P(("data", "fsdp"))
    # 4 batch shards of 2 rows, each held by the 2 'tensor' devices
    rows = sorted({(sh.index[0].start, sh.index[0].stop) for sh in g["x"].addressable_shards})
    assert rows == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ShardingError, match="disagree"):
        parallel.global_batch({"x": x, "s": s[:4]}, mesh)
    with pytest.raises(ShardingError, match="expected global batch 16"):
        parallel.global_batch({"x": x}, mesh, global_size=16)


def test_host_batch_slice_is_contiguous_block():
    assert parallel.host_batch_slice(16, 0, 2) == slice(0, 8)
    assert parallel.host_batch_slice(16, 1, 2) == slice(8, 16)
    with pytest.raises(ShardingError, match="does not divide over 3 processes"):
        parallel.host_batch_slice(16, 0, 3)


def test_put_global_matches_values_and_shardings():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    tree = {"k": np.arange(32, dtype=np.float32).reshape(4, 8), "b": np.float32(3.0)}
    sh = parallel.param_shardings(tree, mesh)
    out = parallel.put_global(tree, sh)
    np.testing.assert_array_equal(np.asarray(out["k"]), tree["k"])
    assert out["k"].sharding.spec == P(None, "fsdp") and float(out["b"]) == 3.0


def test_initialize_distributed_is_noop_for_single_process(monkeypatch):
    for k in ("FAIRJAX_COORDINATOR", "FAIRJAX_NUM_PROCESSES", "FAIRJAX_PROCESS_ID", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.initialize_distributed(required=False) is False
    assert parallel.initialize_distributed(num_processes=1) is False


# ----------------------------------------------------------------------------- multi-process


def _run(cmd, env_extra=None, timeout=300):
    import os
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, rel):
    """2 processes x 2 CPU devices (gloo, launch/local_multiprocess.sh) == 1 process x 4 devices,
    on the same data=2 x fsdp=2 mesh: 3 steps with a checkpoint each step, then a resume to 5."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    launcher = os.path.join(os.path.dirname(here), "launch", "local_multiprocess.sh")
    worker = [sys.executable, os.path.join(here, "_multihost_worker.py"), "--mesh", "2,2,1", "--batch", "16", "--every", "1"]
    mp = tmp_path / "mp"
    for steps in (3, 5):
        out = _run(["bash", launcher, "-n", "2", "-d", "2", "-l", str(tmp_path / f"logs{steps}"), "--",
                    *worker, "--workdir", str(mp), "--steps", str(steps)])
        assert "SUMMARY" in out.stdout
        if steps == 3:
            os.rename(mp / "final_params.npz", tmp_path / "mp3.npz")
    assert "resumed from" in out.stdout and "checkpoints/3" in out.stdout
    assert sorted(os.listdir(mp / "checkpoints")) == ["3", "4", "5"]
    sp = tmp_path / "sp"
    _run([*worker, "--workdir", str(sp), "--steps", "5", "--devices", "4"])
    got, ref = np.load(mp / "final_params.npz"), np.load(sp / "final_params.npz")
    assert sorted(got.files) == sorted(ref.files)
    for k in ref.files:
        assert rel(got[k], ref[k]) <= 1e-5, k
    # the 3-step multi-process result differs from the 5-step one (training moved on)
    assert max(rel(np.load(tmp_path / "mp3.npz")[k], ref[k]) for k in ref.files) > 1e-4


# ----------------------------------------------------------------------------- tensor-axis rules


def test_tensor_rules_split_column_and_row_kernels_and_fsdp_fills_the_other_dim():
    """Column kernels (in, out): out over tensor, in over fsdp when it fits; row kernels: in over
    tensor; bias of a column layer over tensor; below fsdp_min_size everything else is whole."""
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = parallel.tensor_rules(column=(r"attn/to_(q|k|v)", r"ff/in"), row=(r"attn/to_out", r"ff/out"))
    tree = {"attn": {"to_q": {"kernel": np.zeros((64, 32)), "bias": np.zeros((32,))},
                     "to_out": {"kernel": np.zeros((32, 64)), "bias": np.zeros((64,))}},
            "ff": {"in": {"kernel": np.zeros((6, 128))}, "out": {"kernel": np.zeros((128, 64))}},
            "norm": {"scale": np.zeros((64,))}, "conv": {"kernel": np.zeros((3, 3, 16, 64))}}
    sh = parallel.param_shardings(tree, mesh, rules, min_size=1024)
    spec = lambda *p: sh[p[0]][p[1]][p[2]].spec  # noqa: E731
    assert spec("attn", "to_q", "kernel") == P("fsdp", "tensor")
    assert spec("attn", "to_q", "bias") == P("tensor")
    assert spec("attn", "to_out", "kernel") == P("tensor", "fsdp")
    assert spec("attn", "to_out", "bias") == P()  # small: replicated
    assert spec("ff", "in", "kernel") == P(None, "tensor")  # 6 does not divide over fsdp=4: whole
    assert spec("ff", "out", "kernel") == P("tensor", "fsdp")
    assert sh["norm"]["scale"].spec == P()
    assert sh["conv"]["kernel"].spec == P(None, None, None, "fsdp")  # 9216 elements >= 1024: FSDP default
    small = parallel.param_shardings(tree, mesh, rules, min_size=10**6)  # min size above every param
    assert small["attn"]["to_q"]["kernel"].spec == P(None, "tensor") and small["conv"]["kernel"].spec == P()
    with pytest.raises(ShardingError, match=r"splits dim 3 of param ff/in/kernel \(6, 3\) 2 ways"):
        parallel.param_shardings({"ff": {"in": {"kernel": np.zeros((6, 3))}}}, mesh, rules)


@pytest.mark.parametrize("which", ["unet", "vila_u"])
def test_shipped_rules_match_every_attention_and_mlp_kernel(which):
    """The models' rules name real param paths: every q/k/v/out and MLP in/out kernel of the tiny SDXL
    UNet and of the tiny VILA-U (LLaMA, depth transformer) is split over tensor (2) on the right dim."""
    import re

    import jax

    from fairjax.io.tree import flatten, path_str

    if which == "unet":
        from fairjax.models import unet

        model = unet.UNet2DConditionModel.from_config(dict(
            _class_name="UNet2DConditionModel", in_channels=4, out_channels=4, block_out_channels=[8, 16],
            layers_per_block=1, transformer_layers_per_block=[1, 1], attention_head_dim=[1, 2], norm_num_groups=4,
            sample_size=8, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True, cross_attention_dim=16))
        shapes = unet.param_shapes(model)
        rules, col, row = unet.PARTITION_RULES, r"(to_[qkv]|net_0/proj)/kernel$", r"(to_out_0|net_2)/kernel$"
    else:
        from fairjax.convert.vila_u import SIGLIP_KEY, build_vision_tower
        from fairjax.models import vila_u
        from fairjax.vila_u.tiny import TINY as t

        vt_cfg = {"rqvaesiglip": t["rqvaesiglip"], "rqtransformer": t["rqtransformer"], "hidden_size": 32,
                  SIGLIP_KEY: t["siglip"]}
        shapes = jax.eval_shape(vila_u.build(t["llm"], vt_cfg, t["mm_projector"]).init, jax.random.key(0))
        size = t["siglip"]["image_size"]
        shapes["vision_model"] = jax.eval_shape(build_vision_tower(vt_cfg, t["siglip"]).init, jax.random.key(0),
                                                jax.numpy.zeros((1, 3, size, size)))["params"]
        rules = vila_u.PARTITION_RULES
        col = r"((q|k|v|gate|up)_proj|query|key|value|mlp_0|fc1)/kernel$"
        row = r"(o_proj|out_proj|down_proj|attn/proj|mlp_2|fc2)/kernel$"
    mesh = parallel.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    sh = parallel.param_shardings(shapes, mesh, rules)
    seen = {"col": 0, "row": 0}
    for path, s in flatten(sh).items():
        name = path_str(path)
        if re.search(col, name):
            assert s.spec[1] == "tensor", name
            seen["col"] += 1
        elif re.search(row, name):
            assert s.spec[0] == "tensor", name
            seen["row"] += 1
    assert seen["col"] >= 4 and seen["row"] >= 2, seen
    if which == "vila_u":  # LLaMA, depth transformer and vision tower all covered
        names = [path_str(p) for p, s in flatten(sh).items() if "tensor" in tuple(s.spec)]
        assert all(any(n.startswith(top) for n in names) for top in ("llm", "rqtransformer", "vision_model")), names
