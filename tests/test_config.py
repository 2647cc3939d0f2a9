"""Config loading, overrides and the workdir config check (fairjax.config)."""

import json
import os
import textwrap

import pytest

from fairjax import config as cl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOG = os.path.join(REPO, "configs", "popalign_mog.py")


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "exp.py"
    p.write_text(textwrap.dedent("""
        import ml_collections
        PRESETS = ("a", "b")
        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            c.lr = 0.1
            c.steps = 10
            c.name = "x"
            c.flag = False
            c.shape = (1, 2)
            c.opt = ml_collections.ConfigDict({"b1": 0.9})
            if arg == "b":
                c.steps = 20
            return c
    """))
    return str(p)


def test_presets_and_overrides(cfg_file):
    c = cl.load_config_file(cfg_file + ":b")
    assert c.steps == 20
    cl.apply_overrides(c, {"lr": "3", "opt.b1": "0.5", "flag": "true", "name": "y", "shape": "[3, 4]"})
    assert c.lr == 3.0 and isinstance(c.lr, float)
    assert c.opt.b1 == 0.5 and c.flag is True and c.name == "y" and c.shape == (3, 4)


def test_split_overrides():
    rest, ov = cl.split_overrides(["--workdir", "w", "--config.beta=2", "--config.a.b", "3"])
    assert rest == ["--workdir", "w"] and ov == {"beta": "2", "a.b": "3"}


def test_unknown_key_and_bad_type(cfg_file):
    c = cl.load_config_file(cfg_file)
    with pytest.raises(cl.ConfigError, match=r"unknown config key 'opt.b3'.*b1"):
        cl.apply_overrides(c, {"opt.b3": "1"})
    with pytest.raises(cl.ConfigError, match=r"unknown config key 'nope'"):
        cl.apply_overrides(c, {"nope": "1"})
    with pytest.raises(cl.ConfigError, match=r"unknown config key 'opt.b1.x': opt.b1 is a value \(.*\), not a section; "
                       r"set it with --config.opt.b1=VALUE"):
        cl.apply_overrides(c, {"opt.b1.x": "1"})
    with pytest.raises(cl.ConfigError, match=r"--config.steps: expected int"):
        cl.apply_overrides(c, {"steps": "'ten'"})


def test_unknown_preset_and_missing_file(cfg_file, tmp_path):
    with pytest.raises(cl.ConfigError, match=r"unknown preset 'zz'.*a, b"):
        cl.load_config_file(cfg_file + ":zz")
    with pytest.raises(cl.ConfigError, match="not found"):
        cl.load_config_file(str(tmp_path / "none.py"))
    with pytest.raises(cl.ConfigError, match="unknown preset"):
        cl.load_config_file(MOG + ":nonexistent")


def test_workdir_holds_other_run(cfg_file, tmp_path):
    wd = str(tmp_path / "wd")
    c = cl.load_config_file(cfg_file)
    assert cl.check_or_save(c, wd) == []
    saved = open(os.path.join(wd, "config.json")).read()
    assert cl.check_or_save(cl.load_config_file(cfg_file), wd) == []  # same config resumes
    c2 = cl.load_config_file(cfg_file + ":b")
    with pytest.raises(cl.ConfigError, match=r"different config \(differs in: steps\)"):
        cl.check_or_save(c2, wd)
    assert open(os.path.join(wd, "config.json")).read() == saved  # nothing overwritten
    assert cl.check_or_save(c2, wd, allow_change=True) == ["steps"]
    assert json.load(open(os.path.join(wd, "config.json")))["steps"] == 10
    assert json.load(open(os.path.join(wd, "config.resumed.json")))["steps"] == 20


def test_old_schema_key_names_the_new_key():
    """Keys of the two schemas before they became one are refused with the key to use instead."""
    from fairjax.tasks.diffusion_pref import make_config

    for old, new in [("model_dir", "model.dir"), ("dtype", "model.dtype"), ("remat", "model.remat"),
                     ("attention_implementation", "model.attention")]:
        with pytest.raises(cl.ConfigError, match=f"'{old}' was renamed to '{new}'") as e:
            cl.apply_overrides(make_config("popalign"), {old: "x"})
        assert "\n" not in str(e.value)
    from fairjax.tasks.vila_u_pref import default_config

    for old, new in [("data.dir", "data.path"), ("model.attention_impl", "model.attention")]:
        with pytest.raises(cl.ConfigError, match=f"'{old}' was renamed to '{new}'"):
            cl.apply_overrides(default_config(), {old: "x"})


def test_every_task_config_uses_the_one_schema():
    """model.{dir, dtype, param_dtype, remat, attention}, data.{path, split}, lora.{rank, alpha, targets, dropout}."""
    from fairjax.tasks.diffusion_pref import make_config
    from fairjax.tasks.vila_u_pref import default_config
    from fairjax.toy.config import make_config as toy_config

    for c in (make_config("popalign"), make_config("sft", "lora"), default_config(), toy_config()):
        for key in ("dir", "dtype", "param_dtype", "remat", "attention"):
            assert key in c.model, (c.task, key)
        for key in ("path", "split"):
            assert key in c.data, (c.task, key)
        for key in ("rank", "alpha", "targets", "dropout"):
            assert key in c.lora, (c.task, key)
        for old in ("model_dir", "dtype", "remat", "attention_implementation"):
            assert old not in c, (c.task, old)


def test_resuming_a_workdir_saved_under_old_keys_names_the_rename(tmp_path):
    import json

    from fairjax.tasks.diffusion_pref import make_config

    (tmp_path / "config.json").write_text(json.dumps({"model_dir": "m", "dtype": "auto", "loss": "popalign"}))
    with pytest.raises(cl.ConfigError, match="model_dir -> model.dir"):
        cl.check_or_save(make_config("popalign"), str(tmp_path))
