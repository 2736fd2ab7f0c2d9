"""The trainer (``fa-hvd-train``) and its components, one job each.

* :mod:`.config` -- the run config: typed sections, validated on load, hashed;
* :mod:`.data` -- data sets from local files and the batches a rank trains on;
* :mod:`.sharding` -- each rank's shard and sample order (shared with the simulation);
* :mod:`.models` -- models by name;
* :mod:`.optim` -- the local optimizer and the learning-rate schedule;
* :mod:`.control` -- preemption signals and the per-step agreement of the ranks;
* :mod:`.metrics` -- metrics.jsonl, progress, summary.json;
* :mod:`.trust` -- per-rank trust over the run, each rank's identity, the suspects it names;
* :mod:`.tensorboard` -- rank 0's TensorBoard scalars (optional package);
* :mod:`.resume` -- which checkpoint to resume from (every rank together), set-aside, the run lock;
* :mod:`.elastic` -- Horovod elastic mode;
* :mod:`.trainer` -- the loop assembled from them, and the command line.

Checkpoint files are :mod:`fa_hvd.checkpoint`'s.
"""
