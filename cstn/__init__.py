"""The model side: what is trained, how, and how it is scored. Nothing here knows MLflow exists
except :mod:`.tracking` and :mod:`.run_records`, which only ``launch/`` uses.

* configuration: :mod:`.config` (typed sections, YAML, overrides);
* the networks: :mod:`.models` (CSTN, CAM, the comparison methods), :mod:`.inference` (p(c, l, s)
  -> classes and boxes), :mod:`.predictor` (one module from images to boxes, the deployed form);
* training: :mod:`.losses`, :mod:`.params` and :mod:`.optim` (parameter groups, optimizer,
  schedule), :mod:`.train_loop` (DeepSpeed step helpers), :mod:`.data_plan` (which micro-batches
  a rank trains on, across a change of world size), :mod:`.checkpoint`, :mod:`.run_lock`;
* scoring: :mod:`.evaluation` (the distributed loop), :mod:`.metrics` (the figures), :mod:`.viz`;
* shared: :mod:`.dist` (process groups), :mod:`.progress` (progress lines).
"""
