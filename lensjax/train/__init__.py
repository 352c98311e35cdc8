"""Training: `python -m lensjax.train` runs one phase of LensToWords' curriculum.

The package's modules, each one job (the command line is the only one that reads argparse):

  cli.py         the command line: flags -> settings, data, model, initial weights -> a run
  settings.py    a phase's defaults with the flags' overrides, checked up front
  inputs.py      captions split as the original split them; features or decoded images
  sources.py     initial weights: run folders, lensjax checkpoints, HF gpt2 via the bridge
  run_folder.py  run.json, metrics.jsonl, latest/ and best/, loss.png
  loop.py        `PhaseRun` and `run_phase`: the loop, checkpoints, validation, evaluation
  step.py        the jitted training step (`Trainer`): loss, per-component Adam, sharding
  messages.py    the errors the command stops with and what it prints
"""

from lensjax.train.cli import main, run
from lensjax.train.loop import PhaseRun, run_phase
from lensjax.train.messages import Interrupted, NonFiniteLoss, TrainError
from lensjax.train.run_folder import RunFolder, plot_losses
from lensjax.train.settings import Settings, learning_rates

__all__ = ["Interrupted", "NonFiniteLoss", "PhaseRun", "RunFolder", "Settings", "TrainError",
           "learning_rates", "main", "plot_losses", "run", "run_phase"]
