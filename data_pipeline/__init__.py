"""The data pipeline behind ``llama-data``: raw corpora -> clean shards -> token shards -> mixture manifest.

- ``cli``, ``recipe``, ``stages``: the command line, recipe checking, the stages in order;
- ``pipeline``: reader -> steps -> writer over one shard, as tasks; ``task``, ``executor``, ``slurm``:
  completion markers and safe outputs, the local process pool, SLURM job arrays;
- ``document``, ``readers``, ``compression``, ``writers``: Documents in and out;
- ``step``: the bases every step builds on; ``global_step``, ``hash_dedup``: those of the steps that
  compare every shard of a source; ``steps/``: one module per step and the registry recipes name;
- ``ccnet_normalization``: CCNet's line normalisations (dedup, language model);
- ``tools/``: the commands that train and calibrate the models some steps read;
- ``stats``: stage reports; ``tokenize_stage``, ``manifest_stage``: token shards and the manifest.

docs/data_pipeline.md is the reference.
"""
