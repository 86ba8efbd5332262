"""The presets of the training CLI's tasks (`--preset tiny|full`): plain data, so that the table
tool can read them without importing torch."""

from __future__ import annotations

from typing import Any

# tiny: the README's main command (lm: fp and hq_lss in 163 + 203 s on 2 CPU cores of an
# AVX2 EPYC; 800 steps took 12 minutes there, past the README's 10-minute promise) and quick
# looks at the other tasks on a CPU. full: the GPU comparison table, sized so that each run, hq_lss
# included, takes at most about 5 minutes on an H100 with int4train's device-generic CUDA path
# (measured per step: lm 6x384 batch 32 ~0.38 s, ViT 6x192 batch 128 0.39 s, MiniLM batch 32 x 256
# tokens 0.68 s; fp 10-15x faster). Keys are the config fields of each task; flags override them.
# step_lr_scale: the LSQ steps' learning rate as a fraction of lr. The steps are new parameters in
# every task (set from the first batch), so every preset gives them about the same absolute rate,
# 1e-5 to 5e-5: 0.01 of the from-scratch tasks' lr, all of textcls's fine-tuning lr (at 0.01 the
# fine-tune's steps stay where the first batch put them: docs/accuracy.md, "LSQ steps").
# fmt: off
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "lm": {
        "tiny": {"level": "char", "context": 128, "layers": 2, "d_model": 128, "heads": 4,
                 "batch_size": 32, "steps": 400, "epochs": None, "lr": 3e-3, "warmup": 40,
                 "weight_decay": 0.1, "dropout": 0.0, "step_lr_scale": 0.01, "val_fraction": 0.1,
                 "limit_train": None, "limit_test": 65536},
        "full": {"level": "char", "context": 256, "layers": 6, "d_model": 384, "heads": 6,
                 "batch_size": 32, "steps": 800, "epochs": None, "lr": 1e-3, "warmup": 80,
                 "weight_decay": 0.1, "dropout": 0.1, "step_lr_scale": 0.01, "val_fraction": 0.1,
                 "limit_train": None, "limit_test": None},
    },
    "textcls": {
        "tiny": {"max_length": 64, "batch_size": 16, "steps": None, "epochs": 1, "lr": 5e-5,
                 "warmup": 10, "weight_decay": 0.01, "dropout": 0.1, "step_lr_scale": 1.0,
                 "limit_train": 1024, "limit_test": 256},
        "full": {"max_length": 256, "batch_size": 32, "steps": None, "epochs": 2, "lr": 5e-5,
                 "warmup": 30, "weight_decay": 0.01, "dropout": 0.1, "step_lr_scale": 1.0,
                 "limit_train": None, "limit_test": None},
    },
    "imagecls": {
        "tiny": {"patch": 4, "layers": 2, "d_model": 64, "heads": 4, "batch_size": 64,
                 "steps": 600, "epochs": None, "lr": 2e-3, "warmup": 50, "weight_decay": 0.05,
                 "dropout": 0.0, "step_lr_scale": 0.01, "limit_train": None, "limit_test": 2000},
        "full": {"patch": 4, "layers": 6, "d_model": 192, "heads": 6, "batch_size": 128,
                 "steps": None, "epochs": 1.5, "lr": 1e-3, "warmup": 70, "weight_decay": 0.05,
                 "dropout": 0.1, "step_lr_scale": 0.01, "limit_train": None, "limit_test": None},
    },
}
# fmt: on
