"""Entry point: `python -m rml_jax.main --config=configs/digits.py --workdir=runs/digits`.

--mode=train (default) trains and evaluates, resuming from the workdir's latest checkpoint;
--mode=eval restores the latest checkpoint and evaluates it; --mode=predict writes colour masks
and overlays for the images of --config.predict.input; --mode=export writes one model as a TF
SavedModel, ONNX or serialized StableHLO (--config.export.format).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from rml_jax import compilation_cache, config_args
from rml_jax.errors import UserError, fail, run_program

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export"],
                  "train (resumes), eval (latest checkpoint, val mIoU), predict "
                  "(masks for --config.predict.input) or export (config.export: a model for "
                  "serving).")
flags.DEFINE_string("compilation_cache", compilation_cache.DEFAULT_DIR, compilation_cache.HELP)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Keeps the console readable: INFO records from checkpointing internals are dropped."""

  _NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/jax/_src/")

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  try:
    config = FLAGS.config
    config.keys()  # config files load lazily: touch it so a broken one is reported here
  except OSError as e:  # a missing file, or one whose import raised an OSError
    path = _config_path()
    detail = str(e).strip().splitlines()[-1].strip()
    fail(config_args.load_error(e, path) or (
        f"--config: {path}: {detail}" if os.path.isfile(path) else f"--config: {detail}"))
  if not isinstance(config, ml_collections.ConfigDict):
    fail(f"--config: {_config_path()}: get_config returned {type(config).__name__}; expected an "
         "ml_collections.ConfigDict")
  import jax  # after flag parsing, so --help stays fast

  compilation_cache.enable(FLAGS.compilation_cache)

  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  from rml_jax import evaluate, export, predict, train  # jax-heavy: after flag parsing

  modes = {"train": train.train_and_evaluate, "eval": evaluate.evaluate,
           "predict": predict.predict, "export": export.export}
  modes[FLAGS.mode](config, FLAGS.workdir)  # a UserError ends as one line (run_program)


def _config_path() -> str:
  """The parsed --config flag's file, without its :arg."""
  return config_flags.get_config_filename(FLAGS["config"]).partition(":")[0]


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing with one-line errors for bad flags, config files and config overrides."""
  path = config_args.config_file(argv)
  try:
    if path:
      config_args.check_config_source(path)  # a syntax error: file and line, before loading
    return FLAGS(argv)
  except UserError as e:  # raised by get_config(arg)
    fail(str(e))
  except Exception as e:  # the config file's own errors first; anything else as before
    problem = config_args.load_error(e, path) if path else None
    if problem is not None:  # the config file raised on import or in get_config, or has none
      fail(problem)
    if isinstance(e, flags.Error):
      fail(str(e).splitlines()[0])
    if isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
      overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
      fail(f"a --config.* override does not fit the config ({type(e).__name__}: {e}); "
            f"overrides given: {', '.join(overrides) or 'none'}")
    raise


def run():
  sys.argv = config_args.with_packaged_configs(sys.argv)
  run_program(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
