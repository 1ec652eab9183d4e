"""Two JAX processes (4 fake CPU devices each, coordinator on 127.0.0.1) against one process with
8 devices (tests/test_multiprocess.py): the real train input pipeline, a few train steps, an
orbax checkpoint of the state and the grain iterators, restored and compared.

  python -m tests.multiprocess_check multi DATA_DIR OUT_DIR PORT PROCESS_ID
  python -m tests.multiprocess_check single DATA_DIR OUT_DIR

`multi` reads its own shard of the data (as every multi-host run does); `single` builds the same
global batches by concatenating the local batches each of the two processes would read.
The models use GELU (config.model.activation) here: tests/README.md says why.
"""

import json
import os
import sys

import jax
import numpy as np

STEPS = 3


def _config(data_dir):
  from tests.conftest import tiny_config

  # The full RML step (teachers, prototypes, CutMix) on the real input pipeline.
  config = tiny_config(data_dir, "mode=rml,optimizer.name=sgd,model.activation=gelu,"
                                 "optimizer.learning_rate=0.01,optimizer.warmup_steps=0,"
                                 "rml.rectify_start_step=0")
  config.labeled_batch_size = config.unlabeled_batch_size = 8
  return config


def _iterator(config, process_index, process_count):
  """The train iterator that process `process_index` of `process_count` reads."""
  from rml_jax import datasets, input_pipeline

  real = (jax.process_index, jax.process_count)
  jax.process_index, jax.process_count = (lambda: process_index), (lambda: process_count)
  try:
    sources = datasets.data_sources(config.data)
    labeled, unlabeled = datasets.split(config.data, sources)
    return input_pipeline.train_iterator(config, sources.train, labeled, unlabeled, True)
  finally:
    jax.process_index, jax.process_count = real


def _host_value(x):
  """A replicated global array -> numpy (each process holds a full copy)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x.addressable_data(0))


def main():
  mode, data_dir, out_dir = sys.argv[1:4]
  if mode == "multi":
    port, process_id = int(sys.argv[4]), int(sys.argv[5])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=120)
  from rml_jax import checkpoint, sharding
  from rml_jax.program import Program

  config = _config(data_dir)
  assert jax.device_count() == 8, jax.devices()
  program = Program.create(config)
  mesh, abstract, train_fn = program.mesh, program.abstract_state, program.train_fn
  train_state = program.fresh_state(jax.random.key(0))
  if mode == "multi":
    iterators = [_iterator(config, jax.process_index(), 2)]
  else:
    iterators = [_iterator(config, p, 2) for p in range(2)]
  history = []
  compiled = None
  for _ in range(STEPS):
    local = [next(it) for it in iterators]
    batch = sharding.to_global(jax.tree.map(lambda *xs: np.concatenate(xs), *local), mesh)
    if compiled is None:
      compiled = train_fn.lower(train_state, batch).compile()
      if mode == "multi":  # both compiled: the first collective's setup has a 30 s deadline
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier("rml_jax_compiled", 600_000)
    train_state, metrics = compiled(train_state, batch)
    history.append({k: np.asarray(_host_value(v), np.float64).tolist()  # scalars and [K]
                    for k, v in metrics.items()})
  # RML_CHECK_CHECKPOINTS: where to checkpoint (the test passes a gs:// bucket); default local.
  directory = os.environ.get("RML_CHECK_CHECKPOINTS") or os.path.join(out_dir, "work",
                                                                      "checkpoints")
  checkpointer = checkpoint.Checkpointer(directory)
  checkpointer.save(STEPS, train_state, iterators[0], {"check": mode}, force=True)
  checkpointer.wait()
  restored = checkpointer.restore(STEPS, abstract, {"check": mode})
  leaves = [_host_value(x) for x in jax.tree.leaves(train_state)]
  restored_equal = all(np.array_equal(a, _host_value(b))
                       for a, b in zip(leaves, jax.tree.leaves(restored)))
  checkpointer.close()
  # RML_CHECK_RESTORE_FROM: another run's checkpoints (the two processes'), restored here.
  foreign = {}
  if os.environ.get("RML_CHECK_RESTORE_FROM"):
    other = checkpoint.Checkpointer(os.environ["RML_CHECK_RESTORE_FROM"], read_only=True)
    foreign = {f"arr_{i}": _host_value(x) for i, x in enumerate(jax.tree.leaves(
        other.restore(other.latest_step(), abstract, {"check": "multi"})))}
    other.close()
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, "state.npz"), *leaves)
    if foreign:
      np.savez(os.path.join(out_dir, "restored_foreign.npz"), **foreign)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
      json.dump({"history": history, "restored_equal": restored_equal,
                 "processes": jax.process_count(), "local_devices": jax.local_device_count()}, f)
  print("done", jax.process_index(), flush=True)


if __name__ == "__main__":
  main()
