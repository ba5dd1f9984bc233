"""Experimental methods: new post-training methods land here first, one self-contained module each.

Contract:
- No stability promise: names, defaults, metrics and behaviour may change (or a method may move to the stable
  core, or be removed) in any release. Pin the jaxpt version if you depend on one.
- Each module holds the whole method: its config dataclass (TRL's names and defaults where TRL has the method),
  its pure loss (docstring with the formula and the paper), data preparation, `make_train_step` (jitted, explicit
  shardings, state donated) and `train()`, plus a `jaxpt <method>` command.
- Each is tested against TRL's own loss code where TRL has the method (otherwise against the paper's formula
  computed independently in float64), and trains a tiny model that improves its own objective.
- Dependency rules: an experimental module may use the stable helpers (`jaxpt.data`, `jaxpt.loop`,
  `jaxpt.sharding`, `jaxpt.train_state`, `jaxpt.losses.logprobs`, ...), never another experimental module; it
  imports a stable method module only when it extends that method (`bema` is DPO with another reference and uses
  `jaxpt.dpo`'s data and step; `iw_opd` extends `jaxpt.distillation`, `async_grpo` `jaxpt.grpo`). Stable code
  never imports `jaxpt.experimental` (`jaxpt.cli` reaches the commands lazily, as it does every method).
- Importing this package imports no method: `from jaxpt.experimental import orpo`.

Methods:
- `orpo`: ORPO (arXiv:2403.07691), TRL's `trl.experimental.orpo`.
- `cpo`: CPO (arXiv:2401.08417) with SimPO (arXiv:2405.14734) and AlphaPO (arXiv:2501.03884), TRL's
  `trl.experimental.cpo`.
- `tpo`: TPO (arXiv:2405.16681) on (prompt, chosen, rejected, gold reference) triples, TRL's `trl.experimental.tpo`.
- `bema`: DPO with a BEMA reference (arXiv:2508.00180), TRL's `trl.experimental.bema_for_ref_model`.
- `bco`: BCO (arXiv:2404.04656) on unpaired feedback (TRL 1.16 no longer has it: tested against the paper).
- `iw_opd`: Importance-Weighted On-Policy Distillation (arXiv:2606.22600), TRL's `trl.experimental.iw_opd`;
  extends `jaxpt.distillation`.
- `async_grpo`: GRPO with the next rollout overlapping the update (bounded staleness, importance correction),
  TRL's `trl.experimental.async_grpo`; extends `jaxpt.grpo`.
"""
