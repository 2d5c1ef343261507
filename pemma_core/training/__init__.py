"""What a site trains and how it is scored.

* :mod:`~pemma_core.training.local`: the one optimiser step (``train_step``), local
  training with modality dropout (``train_local``, ``train_backbone``), sliding-window
  prediction and the one Dice evaluation (``evaluate_cases``, ``evaluate``).
* :mod:`~pemma_core.training.optimizer`: the AdamW of every training run (each parameter
  group at its model's rate scale), and a site's moments carried from one federated round
  to the next.
* :mod:`~pemma_core.training.survival`: Cox partial likelihood, C-index, the survival
  head and EHR encoder modules.
* :mod:`~pemma_core.training.prognosis`: survival cohorts from site data and training
  the survival head on them, locally and federated.
"""
