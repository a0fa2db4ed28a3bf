"""The data side: datasets -> WebDataset shards -> batches on every rank.

* the contract: :mod:`.schema` (sample members, the one box conversion), :mod:`.batch` (the one
  batch type), :mod:`.manifest` (a split's manifest), :mod:`.dali_index` (the per-shard index);
* writing shards: :mod:`.sources` (ILSVRC, CUB, synthetic) -> :mod:`.shards` (the converter) ->
  :mod:`.shard_worker` (per-image checks in worker processes; :mod:`.jpeg_check`) ->
  :mod:`.tarshard` (one tar and its index); :mod:`.remote` (shards under a URL, cached on the node);
* reading them: :mod:`.loader` chooses and builds a backend, :mod:`.dali` or :mod:`.torch_reader`,
  both built on :mod:`.request` (what they share) and nothing else of this package's readers;
  :mod:`.worker_guard` (reader processes die with their parent).
"""
