"""The PopAlign paper's 1-D population experiment (sec. 5), exact likelihoods.

  python -m fairjax.train --config configs/popalign_mog.py --workdir runs/mog
  python -m fairjax.train --config configs/popalign_mog.py:sft --workdir runs/mog_sft
  python -m fairjax.train --config configs/popalign_mog.py:calibrated --workdir runs/mog_cal
  python -m fairjax.train --config configs/popalign_mog.py --config.beta=2.0 --workdir runs/mog_b2

Reference mixture weights softmax(1, 0, -1), means (-7, 0, 7), sigmas 1;
1000 preference samples (500 winners balanced over the outer components, 500
losers from the reference restricted to them). Full-batch Adam to convergence;
seconds on a CPU. Writes mixture.json and density.png into the workdir.
"""

from fairjax.trainer import default_train_config

PRESETS = ("popalign", "sft", "calibrated")


def get_config(arg=None):
    c = default_train_config()
    c.task = "mog"
    c.loss = "popalign"
    c.beta = 1.0
    c.alpha = 0.5  # PopAlign's normaliser weight (centring term), paper's "alpha"
    c.calibrate_beta = False  # True: beta from fairjax.losses.calibrate_beta on the data's group frequencies

    c.mog = dict(
        ref_logits=(1.0, 0.0, -1.0),
        means=(-7.0, 0.0, 7.0),
        sigmas=(1.0, 1.0, 1.0),
        n_samples=1000,
        winner_components=(0, 2),
        data_seed=0,
    )

    c.seed = 0
    c.total_steps = 3000
    c.batch_size = 1000
    c.optimizer.name = "adam"
    c.optimizer.lr = 0.02
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    c.optimizer.grad_clip = 0.0
    c.optimizer.weight_decay = 0.0
    c.checkpoint.every_steps = 1000
    c.log_every_steps = 100

    if arg == "sft":
        c.loss = "sft"
        c.batch_size = 496  # winners only (500), reshuffled each epoch; divides over 8 devices
    elif arg == "calibrated":
        c.calibrate_beta = True
    elif arg not in (None, "popalign"):
        raise ValueError(f"unknown preset {arg!r}; choose one of {PRESETS}")
    return c
