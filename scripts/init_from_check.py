"""Where fine-tuning starts: the validation loss right after ``--model.init_from`` against the pretrained model's.

    python scripts/init_from_check.py --config configs/quickstart.yaml --model.init_from exported/quickstart \
        --trainer.max_steps 40 --trainer.val_check_interval 20

Takes the flags of ``python -m rnnlm.fit`` and trains as it does, with the sanity check run over the whole
validation split (``--trainer.num_sanity_val_steps -1``): that pass sees the weights exactly as ``init_from`` left
them. Prints its loss, the pretrained model's loss on the same split and streams (``rnnlm.evaluate``), and the
validation losses as training goes on. On the pretraining data the first two agree (to float rounding); an
untrained model would be near ln V.
"""

from __future__ import annotations

import json
import math
import sys

import lightning as L

from rnnlm.evaluate import evaluate
from rnnlm.fit import main as fit_main


class ValidationLosses(L.Callback):
    """The loss of every validation pass, the sanity check's (step 0, before any update) included."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.losses.append((0, float(trainer.callback_metrics["val/loss"])))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.losses.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


def main(argv: list[str]) -> dict:
    sys.modules.setdefault("init_from_check", sys.modules[__name__])
    cli = fit_main([*argv, "--trainer.num_sanity_val_steps", "-1",
                    f"--trainer.callbacks+={__name__}.ValidationLosses"])
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, ValidationLosses))
    spec = cli.model.hparams.init_from
    data = cli.datamodule
    pretrained = evaluate(spec, split="validation", source=data.hparams.source, config_name=data.hparams.config_name,
                          batch_size=data.hparams.eval_batch_size or data.hparams.batch_size, bptt=data.hparams.bptt,
                          accelerator="cpu")
    first = recorder.losses[0][1]
    result = {
        "init_from": spec,
        "pretrained_val_loss": pretrained["loss"],
        "first_val_loss_after_init_from": first,
        "difference": first - pretrained["loss"],
        "ln_vocab": math.log(cli.model.config.vocab_size),
        "val_loss_by_step": recorder.losses,
    }
    print(f"pretrained model, validation loss (rnnlm.evaluate):  {pretrained['loss']:.6f}")
    print(f"right after init_from (sanity check, whole split):    {first:.6f}  (difference {result['difference']:+.2e};"
          f" ln V = {result['ln_vocab']:.4f})")
    for step, loss in recorder.losses[1:]:
        print(f"after step {step:>5}:                                   {loss:.6f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
