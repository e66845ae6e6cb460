"""cmscale.models: the networks and their mathematics, independent of how a run is organised.

- :mod:`cmscale.models.unet`, :mod:`cmscale.models.presets`: the UNet and its size presets (one table).
- :mod:`cmscale.models.precond`: EDM and TrigFlow preconditioners, and EDM seen as TrigFlow.
- :mod:`cmscale.models.losses`: EDM, ECT and sCM losses (each docstring gives its equation).
- :mod:`cmscale.models.samplers`: Heun and n-step consistency sampling.
- :mod:`cmscale.models.flops`: FLOP counting with FlopCounterMode.

Which of these a method uses is decided in :mod:`cmscale.methods` only.
"""
