"""Scanned repeated layers (``scan_layers``): the stacked <-> unrolled param layouts of
:mod:`fairjax.io.tree`, the names they rely on in every fairjax model, the setting's values, and the
FSDP placement of stacked params, and short SDXL task runs with ``model.scan_layers`` (their outputs and
exports vs the unrolled runs'). The models' scanned = unrolled = PyTorch parity lives with each model's
parity tests (test_unet.py, test_llama.py, test_vila_u.py), the LoRA layout in test_lora.py, the VILA-U
task in test_vila_u_train.py."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_sdxl import ROOT, config

from fairjax import trainer
from fairjax.io.model_dir import load_params
from fairjax.io.tree import shapes_of
from fairjax.tasks import diffusion_pref as dp

from fairjax.errors import CheckpointError, ConfigError
from fairjax.io.tree import STACKED, flatten, locate, stack_layers, unrolled_shapes, unstack_layers
from fairjax.models.layers import scan_layers_setting


def _tree(seed=0, n=3):
    rng = np.random.default_rng(seed)
    layer = lambda: {"attn": {"to_q": {"kernel": rng.standard_normal((4, 6)).astype(np.float32)}},  # noqa: E731
                     "norm": {"scale": rng.standard_normal(4).astype(np.float32)}}
    return {"conv_in": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
            "down_blocks_0": {"attentions_0": {f"transformer_blocks_{i}": layer() for i in range(n)},
                              "attentions_1": {"transformer_blocks_0": layer()}},
            "model": {"layers_0": layer(), "layers_1": layer(), "norm": {"scale": np.ones(4, np.float32)}}}


def test_stack_unstack_round_trip_is_exact():
    tree = _tree()
    st = stack_layers(tree)
    blocks = st["down_blocks_0"]["attentions_0"]["transformer_blocks"]
    assert blocks["attn"]["to_q"]["kernel"].shape == (3, 4, 6) and isinstance(blocks["norm"]["scale"], np.ndarray)
    assert st["down_blocks_0"]["attentions_1"]["transformer_blocks"]["norm"]["scale"].shape == (1, 4)  # 1-layer stack
    assert st["model"]["layers"]["attn"]["to_q"]["kernel"].shape == (2, 4, 6) and "norm" in st["model"]
    for i in range(3):  # row i is layer i
        np.testing.assert_array_equal(blocks["attn"]["to_q"]["kernel"][i],
                                      tree["down_blocks_0"]["attentions_0"][f"transformer_blocks_{i}"]["attn"]["to_q"]["kernel"])
    back = unstack_layers(st)
    a, b = flatten(back), flatten(tree)
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    same = flatten(unstack_layers(tree))  # the unrolled layout passes through
    assert same.keys() == b.keys() and all(same[k] is b[k] for k in b)
    # jax arrays stack with jnp (jittable), abstract leaves stay abstract, with the same unrolled shapes
    jt = jax.jit(stack_layers)(jax.tree.map(jnp.asarray, tree))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jt), jax.tree.leaves(st)))
    abstract = stack_layers(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
    assert abstract["model"]["layers"]["attn"]["to_q"]["kernel"] == jax.ShapeDtypeStruct((2, 4, 6), jnp.float32)
    assert unrolled_shapes(st) == unrolled_shapes(tree) == {"/".join(k): v.shape for k, v in b.items()}
    assert locate(st, "model/layers_1/attn/to_q/kernel") == (("model", "layers", "attn", "to_q", "kernel"), 1)
    assert locate(st, "model/norm/scale") == (("model", "norm", "scale"), None)
    assert locate(st, "model/layers_2/attn/to_q/kernel") is None and locate(st, "model/nothing") is None


@pytest.mark.parametrize("bad, words", [
    ({"layers_0": {"w": np.zeros(2)}, "layers_2": {"w": np.zeros(2)}}, "not 0..1"),
    ({"layers_0": {"w": np.zeros(2)}, "layers": {"w": np.zeros(2)}}, "exists beside"),
    ({"layers_0": {"w": np.zeros(2)}, "layers_1": {"w": np.zeros(3)}}, "shapes"),
    ({"layers_0": {"w": np.zeros(2)}, "layers_1": {"v": np.zeros(2)}}, "different params"),
])
def test_stack_refuses_what_is_not_a_layer_stack(bad, words):
    with pytest.raises(CheckpointError, match=words) as e:
        stack_layers(bad)
    assert "\n" not in str(e.value)


def _paths(shapes) -> set[tuple[str, ...]]:
    """Param paths of a ``{path: shape}`` dict or of a (nested) tree."""
    return set(shapes) if isinstance(next(iter(shapes)), tuple) else set(flatten(shapes))


def test_no_fairjax_model_has_an_unindexed_child_of_a_stacked_name():
    """The layout functions read a child named exactly ``transformer_blocks`` / ``layers`` / ``blocks`` as a
    scanned stack: no model's unrolled params may have one, and each scanned model's params are exactly
    ``stack_layers`` of its unrolled ones. VILA-U's mm_projector is the one exception, by design never
    passed to these functions: ``layers_0, layers_2`` (not a stack) and, for ``mm_projector_type='linear'``,
    one un-indexed ``layers``."""
    from fairjax.diffusion import tiny as sdxl_tiny
    from fairjax.models import clip_text, llama, siglip, unet, vae, vila_u
    from fairjax.vila_u.tiny import TINY

    sd = unet.UNet2DConditionModel.from_config(sdxl_tiny.unet_config("tiny"))
    vu = vila_u.build(TINY["llm"], {"rqtransformer": TINY["rqtransformer"], "rqvaesiglip": TINY["rqvaesiglip"]},
                      TINY["mm_projector"])
    vae_cfg = dict(block_out_channels=[8, 16], layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, scaling_factor=0.13)
    trees = {
        "unet": unet.param_shapes(sd),
        "vae": vae.param_shapes(vae.from_config(vae_cfg)),
        "clip": clip_text.param_shapes(clip_text.from_config(sdxl_tiny.clip_config("tiny", 1, 100))),
        "siglip": siglip.param_shapes(siglip.vila_u_encoder(siglip.SiglipVisionConfig.from_dict(TINY["siglip"]))),
        **{k: v for k, v in jax.eval_shape(vu.init, jax.random.key(0)).items() if k != "mm_projector"},
    }
    for name, tree in trees.items():
        unindexed = sorted({"/".join(p[:i + 1]) for p in _paths(tree) for i, k in enumerate(p[:-1]) if k in STACKED})
        assert not unindexed, (name, unindexed)
    scanned = vu.with_scan_layers(True)
    stacked = {"unet": unet.param_shapes(sd.clone(scan_layers=True)),
               **jax.eval_shape(scanned.init, jax.random.key(0))}
    for name in ("unet", "llm", "rqtransformer"):
        want = jax.tree.map(lambda x: (x.shape, x.dtype), stack_layers(trees[name]))
        assert jax.tree.map(lambda x: (x.shape, x.dtype), stacked[name]) == want, name
    assert stacked["llm"]["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 128)
    assert stacked["rqtransformer"]["head_transformer"]["blocks"]["ln1"]["scale"].shape == (2, 32)
    assert llama.param_shapes(vu.llm) == unrolled_view(stacked["llm"])  # the unrolled view of the stacked params


def unrolled_view(tree):
    return {tuple(k.split("/")): v for k, v in unrolled_shapes(tree).items()}


def test_scan_layers_setting():
    assert scan_layers_setting("auto", backend="cpu") is False
    assert scan_layers_setting("auto", backend="gpu") is True and scan_layers_setting(None, backend="tpu") is True
    assert scan_layers_setting(True) is True and scan_layers_setting("false") is False
    assert scan_layers_setting(" True ") is True
    with pytest.raises(ConfigError, match="auto, true, false") as e:
        scan_layers_setting("yes please")
    assert "\n" not in str(e.value)


def test_fsdp_never_shards_the_layer_axis():
    from fairjax import parallel

    mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    # (16 layers, 8, 24): the largest divisible dim of the unrolled view (24) is sharded, never the 16 layers
    spec = parallel.param_spec("down_blocks_1/attentions_0/transformer_blocks/attn1/to_q/kernel", (16, 8, 24), mesh)
    assert tuple(spec) == (None, None, "fsdp")
    assert tuple(parallel.param_spec("model/layers/input_layernorm/scale", (32, 4), mesh)) == (None,)
    assert tuple(parallel.param_spec("model/layers_3/mlp/up_proj/kernel", (16, 24), mesh)) == (None, "fsdp")


# ----------------------------------------------------------------------------- the SDXL task


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """(model_dir, data_dir, text-embedding cache) of the micro SDXL preset (test_train_sdxl's ``tiny``)."""
    from fairjax.diffusion import text_embeds
    from fairjax.diffusion import tiny as tiny_sdxl

    root = tmp_path_factory.mktemp("micro")
    model_dir, data_dir = tiny_sdxl.ensure(str(root / "micro"), "micro")
    cache = str(root / "text_embeds.safetensors")
    text_embeds.cached_table(model_dir, tiny_sdxl.CAPTIONS, cache)
    return model_dir, data_dir, cache


def _export_tool():
    path = os.path.join(ROOT, "tools", "export_diffusers.py")
    spec = importlib.util.spec_from_file_location("export_diffusers", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def _assert_same_files(a, b, rel, tol=0.0):
    """Two safetensors files: the same keys, dtypes and shapes; values bit-identical (``tol`` 0) or within
    ``tol`` (max |a - b| / max |b| per tensor)."""
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for k in tb:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        if tol:
            assert rel(ta[k], tb[k]) <= tol, (k, rel(ta[k], tb[k]))
        else:
            assert np.array_equal(ta[k], tb[k]), k


def _scan_run(micro, wd, scan, rank):
    """Two SGD steps of PopAlign (beta 20, so float32 rounding of the ~1.0 mse terms stays at ~1e-6 of the
    logits, and SGD, whose update is the gradient itself, not Adam's sign of near-zero gradients) on
    data 2 x fsdp 4; returns (task, trainable at the end, summary)."""
    over = {"model.scan_layers": scan, "optimizer.name": "sgd", "optimizer.lr": 0.5 if rank else 0.05,
            "optimizer.warmup_steps": 0, "lora.rank": rank, "lora.alpha": 8.0}
    cfg = config(micro, total_steps=2, beta=20.0, **over)
    cfg.mesh = dict(data=2, fsdp=4)
    task = dp.DiffusionPrefTask(cfg, wd)
    assert task.scan_layers == (scan == "true") and cfg.model.scan_layers == scan  # "auto" would be recorded too
    seen = {}
    finish = task.finish

    def spy(trainable, frozen, workdir):
        seen["trainable"] = jax.device_get(trainable)
        return finish(trainable, frozen, workdir)

    task.finish = spy
    summary = trainer.train(cfg, task, wd)
    return task, seen["trainable"], summary


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_run_with_scan_layers_exports_what_the_unrolled_run_exports(micro, tmp_path, rel, kind):
    """model.scan_layers true (params stacked per transformer stack in the trainer, its checkpoints and the
    FSDP placement; a LoRA merged per layer into the stacked kernels) vs false, same seed and steps: the
    written model dir / LoRA file and their diffusers / PEFT exports agree to float32 summation order (the
    scanned and unrolled programs sum in different orders, ~1e-7 of each update), and the scanned task's
    output of the unrolled run's own trained params is bit-identical to the unrolled run's, export included."""
    tool = _export_tool()
    rank = 4 if kind == "lora" else 0
    runs = {scan: _scan_run(micro, str(tmp_path / f"run_{scan}"), scan, rank) for scan in ("false", "true")}
    assert rel(runs["true"][2]["loss"], runs["false"][2]["loss"]) <= 1e-5
    out = lambda n: str(tmp_path / n)  # noqa: E731
    if kind == "full":
        stacked = runs["true"][1]["down_blocks_1"]["attentions_0"]["transformer_blocks"]
        assert stacked["attn1"]["to_q"]["kernel"].ndim == 3  # the trainer held the stacked layout
        files = {n: os.path.join(out(n), "model", "unet", "params.safetensors") for n in ("run_true", "run_false")}
        exported = {n: os.path.join(out(f"export_{n}"), "unet", "diffusion_pytorch_model.safetensors") for n in files}
        for n in files:
            assert tool.main([os.path.join(out(n), "model"), out(f"export_{n}")]) == 0
        from fairjax.models import unet as unet_mod

        same = unet_mod.stack_params(runs["false"][1])  # the unrolled run's params through the scanned task
        before = flatten(load_params(os.path.join(micro[0], "unet", "params.safetensors"), shapes_of(runs["false"][1])))
    else:
        assert sorted(runs["true"][1]) == sorted(runs["false"][1])  # keyed by the unrolled paths
        files = {n: os.path.join(out(n), "unet_lora.safetensors") for n in ("run_true", "run_false")}
        exported = {n: os.path.join(out(f"export_{n}"), "pytorch_lora_weights.safetensors") for n in files}
        for n in files:
            assert tool.main([micro[0], out(f"export_{n}"), "--lora", files[n]]) == 0
        same = runs["false"][1]
        before = {k: {"b": np.zeros_like(e["b"])} for k, e in runs["false"][1].items()}  # b starts at 0
        before = {(k + "/b",): v["b"] for k, v in before.items()}
    # the two runs: the same files up to summation order (a LoRA's b is all update, so its float32 noise is
    # relative to the update: 5e-5), and the steps moved the weights much more than that
    tol = 5e-5 if rank else 1e-5
    _assert_same_files(files["run_true"], files["run_false"], rel, tol=tol)
    _assert_same_files(exported["run_true"], exported["run_false"], rel, tol=tol)
    a, b = _tensors(files["run_true"]), _tensors(files["run_false"])
    delta = lambda t: np.concatenate([np.ravel(t["/".join(k)] - v) for k, v in sorted(before.items())])  # noqa: E731
    assert rel(delta(a), delta(b)) <= 1e-4 and np.abs(delta(b)).max() > 1e-4
    # the same trained params through both layouts: bit-identical outputs and exports
    os.makedirs(out("same"))
    runs["true"][0].finish(same, {}, out("same"))
    name = "model/unet/params.safetensors" if kind == "full" else "unet_lora.safetensors"
    _assert_same_files(os.path.join(out("same"), name), files["run_false"], rel)
    src = [os.path.join(out("same"), "model")] if kind == "full" else [micro[0]]
    extra = [] if kind == "full" else ["--lora", os.path.join(out("same"), name)]
    assert tool.main(src + [out("export_same")] + extra) == 0
    same_export = (os.path.join(out("export_same"), "unet", "diffusion_pytorch_model.safetensors") if kind == "full"
                   else os.path.join(out("export_same"), "pytorch_lora_weights.safetensors"))
    _assert_same_files(same_export, exported["run_false"], rel)
